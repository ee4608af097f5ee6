"""A cache's files are checked against what was written there, by verify and by every reader.

Issue 33's reproductions: a valid chunk from another row range or another cache (a target shard
replaced by the next shard or by the same shard of another cache, input_ids from another cache,
loss_fkl and loss_rkl swapped, a local shard-cache file replaced by another shard's) used to
pass every check, and eval printed wrong numbers with exit 0; eval and train accepted caches
that verify refused (ids and counts swapped, logprobs retyped in zarr.json, the manifest's value
encoding edited with its digest recomputed). Now each is refused in one line by all three, and
no file of a cache can run code when read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import GSM8K, build_cache, cache_build_config

from adaspec.cli import cache as cache_cli
from adaspec.cli import eval as eval_cli
from adaspec.cli.common import run
from adaspec.config import build_config
from adaspec.train import train
from cache_tools import manifest as manifest_io
from cache_tools import store
from cache_tools.verify import verify_cache

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = Path("gsm8k") / "train"


def _cache(base: Path, model_dir: Path, limit: int = 8, **cache_kw) -> Path:
    cfg = cache_build_config(base, model_dir, shard_rows=64, chunk_rows=32, **cache_kw)
    cfg.data.limit = limit
    build_cache(cfg)
    return base


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tmp_path_factory):
    """Two top-8 caches of the same target over 8 and 12 rows (several shards each), and a
    sampled one."""
    root = tmp_path_factory.mktemp("trust_caches")
    return {"a": _cache(root / "a", tiny_model_dir),
            "b": _cache(root / "b", tiny_model_dir, limit=12),
            "sample": _cache(root / "sample", tiny_model_dir, sparse="sample", draws=8)}


def one_line(capsys, fn) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(lambda _argv: fn() or 0, [])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    code = exit_info.value.code or 0
    assert "Traceback" not in err, err[-2000:]
    if code:
        assert code == 2 and len(lines) == 1, err[-2000:]
    return code, (lines[-1] if lines else "")


def uses(capsys, cache: Path, model_dir: Path, tmp_path: Path) -> dict[str, tuple[int, str]]:
    """What verify, offline evaluation and training make of `cache`: (exit code, last line)."""
    common = ["--cache", str(cache), "--task", "gsm8k", "--target", str(model_dir),
              "--data-files", str(GSM8K), "--limit", "8", "--max-length", "512"]
    cfg = build_config({
        "models": {"target": str(model_dir), "draft": f"{model_dir}@layers=1"},
        "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 8, "max_length": 512},
        "cache": {"cache": str(cache)},
        "train": {"k": 1.0, "batch_size": 4, "epochs": 0.5, "out": str(tmp_path / "run")}})
    out = {
        "verify": one_line(capsys, lambda: cache_cli.main(["verify", "--cache", str(cache)])),
        "eval": one_line(capsys, lambda: eval_cli.main([
            *common, "--split", "train", "--draft", f"{model_dir}@layers=1", "--modes",
            "offline", "--no-progress"])),
        "train": one_line(capsys, lambda: train(cfg, progress=False) and None),
    }
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    return out


def _copy(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    return out


def test_an_untouched_cache_is_used(caches, tiny_model_dir, tmp_path, capsys):
    results = uses(capsys, _copy(caches["a"], tmp_path), tiny_model_dir, tmp_path)
    assert all(code == 0 for code, _ in results.values()), results


def _swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


TAMPER = ["next shard", "same shard of another cache", "input_ids of another cache",
          "logprobs retyped int8", "input_ids retyped int16", "shape shrunk",
          "value encoding edited, digest recomputed"]


def _edit_meta(path: Path, key: str, change) -> None:
    data = json.loads(path.read_text())
    data[key] = change(data[key])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("how", TAMPER)
def test_a_cache_verify_refuses_is_refused_by_eval_and_train(caches, tiny_model_dir, tmp_path,
                                                               capsys, how):
    cache = _copy(caches["a"], tmp_path)
    split = cache / SPLIT
    if how == "next shard":
        for name in ("ids", "logprobs", "tail_logmass"):
            tail = "/0" if name != "tail_logmass" else ""
            shutil.copy(split / f"target/{name}/c/1{tail}", split / f"target/{name}/c/0{tail}")
    elif how == "same shard of another cache":
        ours = sorted((split / "target/ids/c").glob("*/0"), key=lambda p: int(p.parent.name))
        differ = [p for p in ours if (caches["b"] / p.relative_to(cache)).is_file()
                  and (caches["b"] / p.relative_to(cache)).read_bytes() != p.read_bytes()]
        assert differ  # the same shard index, other rows (B has 12 rows, A 8)
        shutil.copy(caches["b"] / differ[0].relative_to(cache), differ[0])
    elif how == "input_ids of another cache":
        shutil.copy(caches["b"] / SPLIT / "sequences/input_ids/c/0",
                    split / "sequences/input_ids/c/0")
    elif how == "logprobs retyped int8":
        _edit_meta(split / "target/logprobs/zarr.json", "data_type", lambda _: "int8")
    elif how == "input_ids retyped int16":
        _edit_meta(split / "sequences/input_ids/zarr.json", "data_type", lambda _: "int16")
    elif how == "shape shrunk":
        _edit_meta(split / "target/ids/zarr.json", "shape", lambda s: [s[0] - 10, s[1]])
    else:  # a manifest edited with care: its digest recomputed
        group = store.open_root(str(cache), "a")["gsm8k/train"]
        manifest = manifest_io.Manifest.read(group)
        manifest.stages["target"].params["value_encoding"] = "uint8q"
        manifest_io.write(group, manifest)
    results = uses(capsys, cache, tiny_model_dir, tmp_path)
    for use, (code, err) in results.items():
        assert code == 2, (use, err)


def test_ids_and_counts_swapped_are_refused(caches, tiny_model_dir, tmp_path, capsys):
    cache = _copy(caches["sample"], tmp_path)
    target = cache / SPLIT / "target"
    _swap(target / "ids/c/0/0", target / "counts/c/0/0")
    _swap(target / "ids/zarr.json", target / "counts/zarr.json")  # metadata along: same dtype
    for use, (code, err) in uses(capsys, cache, tiny_model_dir, tmp_path).items():
        assert code == 2, (use, err)


def test_swapped_reference_losses_are_refused(env, tmp_path, capsys):
    from helpers import train_config

    cache = _copy(env.cache, tmp_path)
    ref = cache / SPLIT / "ref" / "ref"
    _swap(ref / "loss_fkl/c/0", ref / "loss_rkl/c/0")
    assert not verify_cache(str(cache)).ok
    cfg = train_config(env, {"cache": str(cache)}, k=0.5, epochs=0.5, out=tmp_path / "run")
    code, err = one_line(capsys, lambda: train(cfg, progress=False) and None)
    assert code == 2 and "loss_fkl" in err, err


def test_a_pickle_codec_planted_in_the_metadata_never_runs(caches, tiny_model_dir, tmp_path,
                                                           capsys):
    """zarr.json naming numcodecs' pickle codec and a chunk holding a payload: refused before
    any chunk is decoded, by verify and the readers."""
    import pickle

    cache = _copy(caches["a"], tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    array = cache / SPLIT / "sequences/offsets"
    meta = json.loads((array / "zarr.json").read_text())
    meta["codecs"] = [{"name": "numcodecs.pickle", "configuration": {"protocol": 4}}]
    (array / "zarr.json").write_text(json.dumps(meta))
    for chunk in (array / "c").iterdir():
        chunk.write_bytes(pickle.dumps(Payload()))
    for use, (code, _) in uses(capsys, cache, tiny_model_dir, tmp_path).items():
        assert code == 2 and not marker.exists(), use


def test_every_file_of_a_cache_replaced_by_a_pickle_never_runs(caches, tmp_path, capsys):
    """Any file of the cache (metadata, chunks, the manifest's group) holding a pickle: verify
    and a reader refuse it or ignore it; the payload never runs."""
    base = caches["a"]
    files = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_file())
    marker = tmp_path / "ran"
    for i, rel in enumerate(files):
        cache = tmp_path / f"c{i}"
        shutil.copytree(base, cache)
        torch.save(_Payload(marker), cache / rel)
        one_line(capsys, lambda c=cache: cache_cli.main(["verify", "--cache", str(c)]))

        def read(c=cache):
            reader = store.CacheReader(str(c), "gsm8k", "train")
            reader.all_tokens()
            reader.target_rows(0, reader.n_label_rows)
        one_line(capsys, read)
        assert not marker.exists(), rel
        shutil.rmtree(cache)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("expires", ["tomorrow", None, [1]])
def test_a_lease_with_a_damaged_expiry_is_taken_over_not_a_traceback(caches, tmp_path, expires):
    from cache_tools import lease

    cache = _copy(caches["a"], tmp_path)
    record = {"zarr_format": 3, "node_type": "group", "attributes": {"adaspec_lease": {
        "host": "elsewhere", "pid": 1, "token": "x", "expires": expires, "released": False}}}
    path = cache / lease.LEASES / "gsm8k.train.rank0" / "zarr.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    with store.build_lock(str(cache), "gsm8k", "train") as held:
        held.check()


# ---------------------------------------------------------------------------------------------
# The local shard cache of a remote cache


@pytest.fixture(scope="module")
def remote(caches):
    """Cache "a" copied into a bucket of a local S3 server (moto's, as test_object_store)."""
    import s3fs

    from bench import instruments

    with instruments.local_s3_server("adaspec-trust") as env:
        s3fs.S3FileSystem(skip_instance_cache=True).put(str(caches["a"]), "adaspec-trust/a",
                                                        recursive=True)
        yield env, "s3://adaspec-trust/a"


def _all_rows(reader) -> dict:
    return {**reader.target_rows(0, reader.n_label_rows), "tokens": reader.all_tokens()[0]}


def test_a_replaced_local_shard_file_is_dropped_and_fetched_again(caches, remote, tmp_path):
    """A file of the local shard cache replaced by another shard's (or garbled) used to be
    read as that shard; now its digest fails, it is fetched again, the rows are the store's."""
    import numpy as np

    from cache_tools import reader as reader_module

    _, root = remote
    folder = tmp_path / "shards"
    want = _all_rows(store.CacheReader(str(caches["a"]), "gsm8k", "train"))
    _all_rows(store.CacheReader(root, "gsm8k", "train", local_cache=(str(folder), 2**30)))
    files = sorted(folder.glob("*.shard"), key=lambda p: p.stat().st_size)
    assert len(files) >= 3
    _swap(files[-1], files[-2])
    files[0].write_bytes(b"garbage")
    reader_module._checked_files.clear()  # a new process: nothing compared yet
    reader = store.CacheReader(root, "gsm8k", "train", local_cache=(str(folder), 2**30))
    got = _all_rows(reader)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert reader.group.store.stats["misses"] >= 3  # the three bad files fetched again


def test_a_local_shard_cache_that_cannot_be_written_only_costs_the_caching(
        caches, remote, tmp_path, monkeypatch):
    """A full (or read-only) local folder: reads are served from the store, not blamed on it."""
    import numpy as np

    from cache_tools import reader as reader_module
    from cache_tools import shard_cache

    _, root = remote
    want = _all_rows(store.CacheReader(str(caches["a"]), "gsm8k", "train"))

    def full(self, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(shard_cache.Path, "write_bytes", full)
    reader_module._checked_files.clear()
    got = _all_rows(store.CacheReader(root, "gsm8k", "train",
                                      local_cache=(str(tmp_path / "full"), 2**30)))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("count", ["sequences", "tokens", "label_tokens"])
def test_manifest_counts_that_disagree_with_the_arrays_are_refused(caches, tmp_path, count):
    """verify used not to compare the manifest's counts with the arrays (nor did the readers)."""
    from cache_tools.errors import CacheError

    cache = _copy(caches["a"], tmp_path)
    group = store.open_root(str(cache), "a")["gsm8k/train"]
    manifest = manifest_io.Manifest.read(group)
    manifest.stages["sequences"].counts[count] += 1
    manifest_io.write(group, manifest)  # its digest recomputed: only the counts are wrong
    report = verify_cache(str(cache))
    assert not report.ok and count in report.message, report.message
    with pytest.raises(CacheError, match=count):
        store.CacheReader(str(cache), "gsm8k", "train")


@pytest.mark.parametrize("cli", ["train", "eval"])
def test_train_and_eval_take_the_local_shard_cache_flags(cli, tmp_path):
    """The README and the readers' own errors name them; only `adaspec-cache build` had them."""
    import importlib

    from adaspec.cli.common import config_from_args

    module = importlib.import_module(f"adaspec.cli.{cli}")
    args = module._parser().parse_args(["--cache", "s3://bucket/c", "--task", "gsm8k",
                                        "--local-cache-mb", "7",
                                        "--local-cache-dir", str(tmp_path),
                                        *(["--draft", "d"] if cli == "eval" else [])])
    cfg = config_from_args(args)
    assert (cfg.cache.local_cache_mb, cfg.cache.local_cache_dir) == (7, str(tmp_path))
