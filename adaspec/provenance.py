"""Is what the cache holds what this run means? Data, tokenizer and reference, checked.

A cached run trains on whatever the cache stores; these checks make sure that is what the user
asked for: the data flags agree with the stored sequences (`check_data`), the model shares the
cache's tokenizer (`check_tokenizer`), and AdaSPEC's stored reference losses come from the
reference the run names, trained from the draft's initialisation (`check_reference`). The ref
training stage records itself for these checks (`record_ref`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from adaspec import draft_vocab, models, runs, tasks
from adaspec.config import Config
from adaspec.errors import UserError
from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.store import CacheReader, CacheWriter

# Data flags that change which sequences a split holds; a cached run must agree with the cache.
DATA_KEYS = ("data_files", "limit", "max_length", "chat_template", "seed")


def reader_of(cfg: Config, split: str | None = None,
              require: tuple[str, ...] = (schema.TARGET,)) -> CacheReader:
    """The reader of cfg's cache for its task and `split` (default: cfg's split), with the
    stages in `require` complete (a one-line CacheError otherwise)."""
    return CacheReader(cfg.cache.cache, cfg.data.task, split or cfg.data.split, require=require,
                       local_cache=local_cache_of(cfg))


def local_cache_of(cfg: Config, root: str | None = None) -> tuple[str, int] | None:
    """(folder, bytes) of the local shard cache kept by readers of a remote cache (`root`,
    default cfg's), or None for a local one or with --local-cache-mb 0."""
    c = cfg.cache
    root = root or c.cache
    if store.is_local(root) or c.local_cache_mb == 0:
        return None
    folder = c.local_cache_dir or str(
        Path.home() / ".cache" / "adaspec" / "shards"
        / hashlib.sha256(root.encode()).hexdigest()[:16])
    return folder, c.local_cache_mb * 2**20


def open_split(cfg: Config, require: tuple[str, ...] = ()) -> CacheReader | None:
    """The cache's reader of the run's split, or None when the cache has no complete sequences
    for it."""
    try:
        return reader_of(cfg, require=require)
    except CacheError:
        return None


def check_data(cfg: Config, reader: CacheReader) -> None:
    """Refuse data flags that disagree with the cache's sequences (the cache defines the data).

    Only values the config file or a flag set are compared: an unset flag means "as cached".
    """
    stored = reader.sequence_params
    for key in DATA_KEYS:
        if f"data.{key}" not in cfg.explicit:
            continue
        asked = getattr(cfg.data, key)
        if key == "data_files":
            have = stored.get("data_files_hash")
            same = (asked is None and have is None) or (
                asked is not None and have is not None and tasks.data_files_hash(asked) == have)
            shown_have = "another file" if have else "the hub's data"
        else:
            have = stored.get(key)
            same = asked == have
            shown_have = repr(have)
        if not same:
            flag = "--data-seed" if key == "seed" else "--" + key.replace("_", "-")
            raise UserError(
                f"the cache's {cfg.data.task}/{cfg.data.split} sequences were built with "
                f"{key}={shown_have} but this run asks {flag} {asked!r}; drop {flag} (the cache "
                f"defines the data) or build a cache for it with another --cache"
            )


def check_tokenizer(reader: CacheReader, tokenizer, what: str = "the model to train") -> None:
    """Refuse a model whose tokenizer is not the one the cache's sequences were made with."""
    models.check_same_tokenizer(tokenizer, reader.tokenizer_fingerprint, what,
                                f"the cache {reader.root}")


def check_can_record_ref(cfg: Config) -> None:
    """Training reads the cache and writes nothing into it, except that a reference (--stage
    ref) records itself in the split's manifest at its end: refuse a cache it cannot write
    before training, not after it."""
    split = Path(str(cfg.cache.cache)) / cfg.data.task / cfg.data.split
    if "://" in str(cfg.cache.cache) or not split.is_dir():
        return  # no local split: nothing to record into (the run trains online)
    if not os.access(split, os.W_OK) or not os.access(split / "zarr.json", os.W_OK):
        raise UserError(
            f"--stage ref records the trained reference in {split}'s manifest, and it is not "
            "writable (training itself writes nothing into a cache); make it writable, or "
            "train on a writable copy")


def record_ref(cfg: Config, run_dir: Path, steps: int) -> None:
    """Record a trained reference in the split's manifest under `refs[cfg.cache.ref_name]`:
    where it is, its weight hash and the identity of the draft it was trained from."""
    model_path = str(runs.model_dir(run_dir).resolve())
    CacheWriter(cfg.cache.cache, cfg.data.task, cfg.data.split).record_ref(cfg.cache.ref_name, {
        "path": model_path,
        "run": str(run_dir.resolve()),
        "weight_hash": models.model_identity(model_path)["weight_hash"],
        "init": cfg.models.draft,
        "init_identity": models.model_identity(cfg.models.draft),
        "loss": cfg.train.loss,
        "epochs": cfg.train.epochs,
        "steps": steps,
    })


def reference_identity(cfg: Config, reader: CacheReader | None, ref_spec: str | None
                       ) -> dict | None:
    """The identity (spec, weight hash) of the reference an AdaSPEC run selects against: the
    model the cached losses were built from, or the online reference."""
    if ref_spec is not None:
        return models.model_identity(ref_spec)
    if reader is None:
        return None
    stage = schema.ref_group_name(cfg.cache.ref_name)
    if not reader.manifest.is_complete(stage):
        return None
    return reader.ref_stage(cfg.cache.ref_name).params.get("model")


def check_same_reference(run_dir: Path, stored: dict | None, now: dict | None) -> None:
    """A resumed AdaSPEC run must keep selecting against the reference it started with."""
    if stored is None or now is None or _same_weights(stored, now):
        return
    raise UserError(
        f"{run_dir} selected its tokens against the reference {_short(stored)}, but the "
        f"reference is now {_short(now)} (retrained or rebuilt?); resuming would mix the two: "
        "start a new run")


def reference_spec(cfg: Config) -> str:
    """The reference a run with k < 1 compares with: --ref, else the one the cache recorded."""
    if cfg.models.ref:
        return cfg.models.ref
    reader = open_split(cfg)
    if reader is not None and cfg.cache.ref_name in reader.recorded_refs:
        return reader.recorded_refs[cfg.cache.ref_name]["path"]
    raise UserError(
        f"--stage draft with k={cfg.train.k:g} needs a reference model: run `adaspec-train "
        "--stage ref` first (it records itself in the cache) or pass --ref PATH"
    )


def _same_weights(a: dict, b: dict) -> bool:
    """Two `models.model_identity` records name the same weights (unknown hashes pass)."""
    if a.get("weight_hash") is None or b.get("weight_hash") is None:
        return True
    return a["weight_hash"] == b["weight_hash"] and a.get("layers") == b.get("layers")


def _short(identity: dict) -> str:
    return f"{identity.get('path')} (weights {str(identity.get('weight_hash'))[:12]})"


def check_reference(cfg: Config, reader: CacheReader) -> None:
    """Refuse cached reference losses that are stale, or a draft that starts elsewhere.

    AdaSPEC's delta = L_draft - L_ref is meaningful only if the stored L_ref come from the
    reference this run names (`--ref`, else the one the ref stage recorded in the manifest),
    against the target rows stored now, and that reference was trained from the draft's
    initialisation. The ref stage stores the weight hash of the model it scored and the target
    stage's params; the record of the ref training stores its init's identity. An explicit
    `--ref` that no ref training of this cache recorded has no known init: only its losses are
    checked, since there is nothing to compare the draft with.
    """
    stage = schema.ref_group_name(cfg.cache.ref_name)
    params = reader.ref_stage(cfg.cache.ref_name).params
    built = params["model"]
    record = reader.recorded_refs.get(cfg.cache.ref_name)
    where = f"{cfg.cache.cache}/{cfg.data.task}/{cfg.data.split}"
    rebuild = (f"`adaspec-cache build --model ref --cache {cfg.cache.cache} --task "
               f"{cfg.data.task} --split {cfg.data.split} --ref-name {cfg.cache.ref_name}")
    if params.get("target") != reader.target_params:
        raise UserError(
            f"the cached reference losses '{stage}' in {where} were computed against another "
            f"target stage than the one stored now; rebuild them with {rebuild} --rebuild`"
        )
    named_spec = cfg.models.ref or (record or {}).get("path")
    if named_spec is not None:
        try:
            named = models.model_identity(named_spec)
        except UserError as err:
            raise UserError(f"the reference {named_spec} cannot be found ({err})") from None
        if not _same_weights(built, named):
            raise UserError(
                f"the cached reference losses '{stage}' in {where} were built from "
                f"{_short(built)} but the reference is now {_short(named)}; rebuild them with "
                f"{rebuild} --model-path {named_spec} --rebuild`"
            )
    if record is not None and "init_identity" in record and _same_weights(built, record):
        init, init_identity = record["init"], record["init_identity"]
    else:  # built with --model-path: an adaspec run folder still says where it started
        init = _run_init(built.get("path"))
        if init is None:
            return  # a reference trained elsewhere: its initialisation is not known here
        init_identity = models.model_identity(init)
    draft = models.model_identity(cfg.models.draft)
    if not _same_weights(init_identity, draft):
        raise UserError(
            f"the reference '{cfg.cache.ref_name}' was trained from {init} but this "
            f"draft starts from {cfg.models.draft}; AdaSPEC compares a draft with a reference of "
            f"the same initialisation: pass --draft {init} or train a "
            "reference from this draft (`adaspec-train --stage ref`)"
        )


def _run_init(model_path: str | None) -> str | None:
    """The draft spec an adaspec run started from, for a model inside its run folder."""
    if not model_path:
        return None
    run_dir = Path(model_path).parent
    if not runs.is_run_folder(run_dir):
        return None
    try:
        return (runs.read_config(run_dir).get("models") or {}).get("draft")
    except UserError:
        return None


def check_same_target(cfg: Config, reader: CacheReader, where: str) -> None:
    """Refuse a second cache (validation continuations) made by another target than the
    run's own cache: its acceptances would measure agreement with a different model."""
    own = open_split(cfg)
    if own is None or schema.TARGET not in own.manifest.stages or \
            schema.TARGET not in reader.manifest.stages:
        return
    a, b = own.target_params.get("model", {}), reader.target_params.get("model", {})
    if not _same_weights(a, b):
        raise UserError(
            f"{where} was built with the target {_short(b)}, but {cfg.cache.cache} with "
            f"{_short(a)}; build both caches from the same target"
        )


def check_reference_vocab(cfg: Config, reader: CacheReader | None, ids) -> None:
    """Refuse an AdaSPEC draft whose token map (`--draft-vocab`; None: the full vocabulary)
    is not its reference's: delta = L_draft - L_ref compares losses over the same outcomes."""
    record = (reader.recorded_refs.get(cfg.cache.ref_name) if reader is not None else None) or {}
    spec = cfg.models.ref or record.get("path")
    if spec is None:
        return
    folder = Path(runs.resolve_run_folder(spec))
    saved = draft_vocab.read_map(folder) if folder.is_dir() else None
    ref_hash = None if saved is None else draft_vocab.map_hash(saved["ids"])
    draft_hash = None if ids is None else draft_vocab.map_hash(ids)
    if ref_hash != draft_hash:
        def name(value, n):
            return "the full vocabulary" if value is None else f"a {n}-id token map ({value})"

        ref_n = len(saved["ids"]) if saved else 0
        raise UserError(
            f"the reference {spec} predicts over {name(ref_hash, ref_n)} but this draft over "
            f"{name(draft_hash, 0 if ids is None else len(ids))}; train both with the same "
            "--draft-vocab from the same cache"
        )
