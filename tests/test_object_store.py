"""A cache on an object store (issue 21): S3's API served by moto's standalone server on
127.0.0.1, as zarr-python's and s3fs's own tests do. Credentials and the endpoint reach every
client through the usual AWS environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import zarr
from helpers import GSM8K, REPO, build_cache, cache_build_config, run_weights

from adaspec.config import build_config
from adaspec.stream import BatchStream
from adaspec.train import train
from cache_tools import lease, store
from cache_tools.errors import CacheError
from cache_tools.location import location_of
from cache_tools.verify import verify_cache

BUCKET = "adaspec-test"


@pytest.fixture(scope="module")
def s3():
    """The AWS environment of a local S3 server (moto's) holding the test bucket."""
    from bench import instruments  # moto is a test dependency (.ci/run installs it): no skipping

    with instruments.local_s3_server(BUCKET) as env:
        yield env


def _arrays(root: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(root, mode="r")
    return {path: member[:] for path, member in group.members(max_depth=None)
            if isinstance(member, zarr.Array)}


def _manifest(root: str) -> dict:
    return dict(store.open_root(root, "r")["gsm8k/train"].attrs)["manifest"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "adaspec.cli.cache", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def built(s3, tiny_model_dir, tmp_path_factory):
    """The same top-8 target stage built into the bucket and into a local folder."""
    local = tmp_path_factory.mktemp("local") / "cache"
    remote = f"s3://{BUCKET}/built"
    build_cache(cache_build_config(local, tiny_model_dir))
    build_cache(cache_build_config(remote, tiny_model_dir))
    return str(local), remote


def test_a_build_into_the_store_equals_a_local_build(built):
    local, remote = built
    a, b = _arrays(local), _arrays(remote)
    rows = [p for p in a if p.startswith("gsm8k/train/")]
    assert set(rows) <= set(b) and len(rows) >= 8
    assert [p for p in rows if not np.array_equal(a[p], b[p])] == []
    assert _manifest(local) == _manifest(remote)
    assert verify_cache(remote).ok


def test_info_and_verify_work_on_an_s3_cache(built):
    _, remote = built
    info = _cli("info", "--cache", remote)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "gsm8k/train" in info.stdout and "target       complete" in info.stdout
    verified = _cli("verify", "--cache", remote)
    assert verified.returncode == 0 and "all good" in verified.stdout


def test_training_from_the_store_equals_training_from_a_local_copy(built, tiny_model_dir,
                                                                   tmp_path):
    weights = []
    for name, cache in zip(("local", "remote"), built, strict=True):
        cfg = build_config({
            "models": {"target": str(tiny_model_dir), "draft": f"{tiny_model_dir}@layers=1"},
            "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 8, "max_length": 512},
            "cache": {"cache": cache, "local_cache_dir": str(tmp_path / "shards")},
            "train": {"k": 1.0, "batch_size": 2, "lr": 1e-3, "epochs": 1.0,
                      "out": str(tmp_path / name)},
        })
        weights.append(run_weights(train(cfg, progress=False)))
    a, b = weights
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k].numpy(), b[k].numpy())] == []


def test_offline_evaluation_from_the_store_equals_it_from_the_local_copy(built, tiny_model_dir,
                                                                       tmp_path):
    from adaspec.evaluate import evaluate

    results = []
    for cache in built:
        cfg = build_config({
            "models": {"target": str(tiny_model_dir)},
            "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 8, "max_length": 512},
            "cache": {"cache": cache, "local_cache_dir": str(tmp_path / "shards")},
        })
        [result] = evaluate(cfg, [f"{tiny_model_dir}@layers=1"], ("offline",), progress=False)
        results.append(result["offline"])
    local, remote = results
    assert local["label_tokens"] == remote["label_tokens"] > 0
    for key in ("expected_acceptance_lower", "expected_acceptance_upper", "greedy_agreement"):
        assert local[key] == remote[key], key


def test_a_second_build_into_the_same_split_is_refused_in_one_line(s3, tiny_model_dir):
    remote = f"s3://{BUCKET}/busy"
    with store.build_lock(remote, "gsm8k", "train"):  # another build, still running
        with pytest.raises(CacheError, match="another build is writing") as err:
            build_cache(cache_build_config(remote, tiny_model_dir))
        assert "\n" not in str(err.value)
        second = _cli("build", "--model", "target", "--target", str(tiny_model_dir),
                      "--task", "gsm8k", "--data-files", str(GSM8K), "--limit", "8",
                      "--cache", remote, "--sparse", "topk", "--topk", "8")
        assert second.returncode == 2
        assert "another build is writing" in second.stderr and "Traceback" not in second.stderr
    with store.build_lock(remote, "gsm8k", "train"):  # released: the next build takes it
        pass


def test_a_lease_whose_holder_stopped_renewing_is_taken_over(s3, monkeypatch):
    root = f"s3://{BUCKET}/leases"
    store.open_root(root, "a")
    objects = lease.objects_of(location_of(root))
    stale = {"host": "another-host", "pid": 1, "token": "x", "renewed": 0.0, "expires": 1.0,
             "released": False}
    key = f"{lease.LEASES}/toy.train.rank0/zarr.json"
    objects.create(f"{lease.LEASES}/zarr.json", lease._group_json(None))
    objects.create(key, lease._group_json({"adaspec_lease": stale}))
    with store.build_lock(root, "toy", "train"):
        held = json.loads(objects.read(key)[0])["attributes"]["adaspec_lease"]
        assert held["pid"] == os.getpid() and not held["released"]
    live = {**stale, "expires": 4e9}  # another host's build, renewing
    data, tag = objects.read(key)
    objects.replace(key, lease._group_json({"adaspec_lease": live}), tag)
    with pytest.raises(CacheError, match="another-host pid 1"):
        with store.build_lock(root, "toy", "train"):
            pass


def test_a_build_that_dies_midway_resumes_to_an_identical_store(built, tiny_model_dir,
                                                                monkeypatch):
    local, _ = built
    remote = f"s3://{BUCKET}/resumed"
    cfg = cache_build_config(remote, tiny_model_dir, shard_rows=256, chunk_rows=128)
    real = store.StageWriter.write_shard
    written = []

    def dies_after_two(self, shard, rows):
        if len(written) == 2:
            raise KeyboardInterrupt  # the process is stopped mid-build
        written.append(shard)
        real(self, shard, rows)

    monkeypatch.setattr(store.StageWriter, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg)
    monkeypatch.setattr(store.StageWriter, "write_shard", real)
    with pytest.raises(CacheError, match="no complete 'target'"):
        store.CacheReader(remote, "gsm8k", "train")
    build_cache(cfg)
    a, b = _arrays(local), _arrays(remote)
    rows = [p for p in a if p.startswith("gsm8k/train/")]
    assert [p for p in rows if not np.array_equal(a[p], b[p])] == []


def test_an_unreachable_endpoint_or_a_missing_bucket_is_one_line(s3):
    for root, env in ((f"s3://{BUCKET}/built", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
                      ("s3://no-such-bucket/cache", None)):
        done = _cli("info", "--cache", root, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr
        assert root in lines[0]


def test_a_local_cache_walked_by_zarr_has_no_stray_files(tmp_path, tiny_model_dir):
    """The build lease is a Zarr group of the store, not a lock file beside it, and --generate's
    staged batches live in a folder beside the cache's."""
    root = tmp_path / "cache"
    build_cache(cache_build_config(root, tiny_model_dir, generate=True, gen_max_new_tokens=8))
    assert list((tmp_path / "cache.staging" / "gsm8k-train").glob("batch-*.npz"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = [path for path, _ in zarr.open_group(str(root), mode="r").members(
            max_depth=None)]
    assert [str(w.message) for w in caught] == []
    assert "gsm8k/train/target/ids" in members and f"{lease.LEASES}" in members
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_the_stream_through_a_small_local_shard_cache_equals_the_local_stream(built, tmp_path):
    """Shards are fetched whole into a bounded local folder (least recently used dropped):
    the batches, their order and a resumed stream are the local ones."""
    local, remote = built
    bound = 12_000  # bytes: a few shard files, so reading the split evicts some
    reader = store.CacheReader(remote, "gsm8k", "train", local_cache=(str(tmp_path), bound))
    cache = reader.group.store
    here = store.CacheReader(local, "gsm8k", "train")

    def batches(source, start=0):
        stream = BatchStream(source, 2, 0, 0, with_target=True, ref=None, memory_budget_mb=0.01)
        return [(b.input_ids.numpy(), b.target.ids.numpy(), b.target.logprobs.numpy())
                for b in stream.batches(start, 8)]

    got, want = batches(reader), batches(here)
    assert len(got) == len(want) == 8
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    resumed = batches(store.CacheReader(remote, "gsm8k", "train",
                                        local_cache=(str(tmp_path), bound)), start=5)
    for a, b in zip(resumed, want[5:], strict=True):
        np.testing.assert_array_equal(a[1], b[1])
    assert cache.stats["misses"] > 0 and cache.stats["evicted"] > 0
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert files and all(p.suffix == ".shard" for p in files)  # no partial download left
    assert sum(p.stat().st_size for p in files) <= bound + max(p.stat().st_size for p in files)


def test_a_two_process_build_into_the_store_equals_one_process(built, tiny_model_dir):
    local, _ = built
    remote = f"s3://{BUCKET}/two-process"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "adaspec.cli.cache", "build", "--model", "target",
           "--target", str(tiny_model_dir), "--task", "gsm8k", "--data-files", str(GSM8K),
           "--limit", "8", "--max-length", "512", "--cache", remote, "--sparse", "topk",
           "--topk", "8", "--value-encoding", "float16", "--shard-rows", "256",
           "--chunk-rows", "128", "--batch-tokens", "512"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 1]" in done.stderr  # two processes really ran
    a, b = _arrays(local), _arrays(remote)
    rows = [p for p in a if p.startswith("gsm8k/train/")]
    assert [p for p in rows if not np.array_equal(a[p], b[p])] == []
    leases = [p for p in b if p.startswith(lease.LEASES)]
    assert leases == []  # leases are groups, not arrays
    held = zarr.open_group(remote, mode="r")[lease.LEASES]
    assert sorted(name for name, _ in held.groups()) == ["gsm8k.train.rank0",
                                                        "gsm8k.train.rank1"]


class DroppingProxy:
    """A proxy to the S3 server that cuts the first response to each chunk GET mid-body (a
    dropped connection), then serves it whole when the client asks again."""

    def __init__(self, upstream: str):
        import socket
        import threading

        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped: list[str] = []
        self._seen: set[str] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    @staticmethod
    def _head(sock, buffer: bytes) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n", rest

    @staticmethod
    def _length(head: bytes) -> int:
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        return 0

    def _relay(self, client) -> None:
        import socket

        upstream = socket.create_connection(self.upstream)
        pending = b""
        try:
            while True:
                request, pending = self._head(client, pending)
                body_len = self._length(request)
                while len(pending) < body_len:
                    pending += client.recv(65536)
                upstream.sendall(request + pending[:body_len])
                pending = pending[body_len:]
                response, extra = self._head(upstream, b"")
                n = self._length(response)
                body = extra
                while len(body) < n and not request.startswith(b"HEAD"):
                    body += upstream.recv(65536)
                line = request.split(b"\r\n")[0].decode()
                if line.startswith("GET") and "/c/" in line and line not in self._seen and n > 8:
                    self._seen.add(line)
                    self.dropped.append(line)
                    client.sendall(response + body[: n // 2])
                    return  # the connection drops mid-body
                client.sendall(response + body)
        except (ConnectionError, OSError):
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


READ_ROWS = """
import hashlib, sys
from cache_tools.store import CacheReader
reader = CacheReader(sys.argv[1], "gsm8k", "train")
rows = reader.target_rows(0, reader.n_label_rows)
digest = hashlib.sha256(b"".join(rows[k].tobytes() for k in sorted(rows)))
print(digest.hexdigest())
"""


def test_a_connection_dropped_mid_read_is_retried(built, s3):
    local, remote = built
    proxy = DroppingProxy(s3["AWS_ENDPOINT_URL"])
    try:
        digests = []
        for root, env in ((local, None),
                          (remote, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})):
            done = subprocess.run([sys.executable, "-c", READ_ROWS, root], cwd=REPO,
                                  capture_output=True, text=True, timeout=300,
                                  env={**os.environ, **(env or {})})
            assert done.returncode == 0, done.stderr[-2000:]
            digests.append(done.stdout.strip())
    finally:
        proxy.close()
    assert proxy.dropped, "the proxy dropped no connection: the test tested nothing"
    assert digests[0] == digests[1]


def test_a_lease_lost_or_unrenewed_stops_the_writer(tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    with store.build_lock(root, "toy", "train") as held:
        held.check()  # held and renewed: writing goes on
        held.renewed -= 2 * held.seconds  # renewals failed past the expiry
        with pytest.raises(CacheError, match="lost its lease .*not renewed"):
            held.check()
    # A create whose answer was lost and retried conflicts with itself: still ours.
    objects = lease.LocalObjects(tmp_path / "cache")
    real = lease.LocalObjects.create

    def answer_lost(self, key, data):
        real(self, key, data)
        raise lease.Changed(key)

    monkeypatch.setattr(lease.LocalObjects, "create", answer_lost)
    with store.build_lock(root, "toy", "other") as held:
        record = json.loads(objects.read(held.key)[0])["attributes"]["adaspec_lease"]
        assert record["token"] == held.holder["token"]


def test_two_remote_caches_share_a_local_shard_folder_without_mixing(built, tiny_model_dir,
                                                                     tmp_path):
    _, first = built
    second = f"s3://{BUCKET}/other"  # the same keys, other arrays (top-4, not top-8)
    build_cache(cache_build_config(second, tiny_model_dir, topk=4))
    shared = (str(tmp_path / "shards"), 10 * 2**20)
    for root in (first, second, first):
        through = store.CacheReader(root, "gsm8k", "train", local_cache=shared)
        direct = store.CacheReader(root, "gsm8k", "train")
        a = through.target_rows(0, through.n_label_rows)
        b = direct.target_rows(0, direct.n_label_rows)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


class Relay:
    """A plain TCP relay to the S3 server whose `close()` cuts every connection at once and
    refuses new ones: the store going down in the middle of a run."""

    def __init__(self, upstream: str):
        import socket
        import threading

        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        import socket

        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


READ_AFTER_SIGNAL = """
import sys
from cache_tools.errors import CacheError
from cache_tools.store import CacheReader
reader = CacheReader(sys.argv[1], "gsm8k", "train")
print("open", flush=True)
sys.stdin.readline()
try:
    reader.target_rows(0, reader.n_label_rows)
except CacheError as error:
    print(f"CacheError: {error}", file=sys.stderr)
    raise SystemExit(3) from None
print("read everything", flush=True)
"""


def test_the_store_going_down_mid_run_is_a_cache_error(built, s3):
    """Issue 33: the store going down after a reader opened the cache was a traceback from the
    S3 client; it is a CacheError (one line in every CLI) naming the cache."""
    _, remote = built
    relay = Relay(s3["AWS_ENDPOINT_URL"])
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}",
           "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
    proc = subprocess.Popen([sys.executable, "-c", READ_AFTER_SIGNAL, remote], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        relay.close()
        out, err = proc.communicate("go\n", timeout=300)
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, (out, err[-2000:])
    assert "read everything" not in out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
