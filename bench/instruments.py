"""What only the benchmarks use: a timed label head and a local S3 server (the plumbing they
share with the studies is in `harness/`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from adaspec import labels
from harness import Timers

# ---------------------------------------------------------------------------------------------
# Patching the library (public names only) and serving loaded models


def timed_label_logits(timers: Timers, name_of: Callable[[object], str | None]) -> type:
    """A `labels.LabelLogits` whose trunk (construction) and head (calls) are timed together
    under `name_of(model)` (None: not timed); one call counted per construction."""

    class TimedLabelLogits(labels.LabelLogits):
        def __init__(self, model, batch, vocab_size=None):
            self.piece = name_of(model)
            start = time.perf_counter()
            super().__init__(model, batch, vocab_size)
            if self.piece is not None:
                timers.add(self.piece, time.perf_counter() - start)

        def __call__(self, start=0, stop=None):
            began = time.perf_counter()
            try:
                return super().__call__(start, stop)
            finally:
                if self.piece is not None:
                    timers.add(self.piece, time.perf_counter() - began, calls=0)

    return TimedLabelLogits


@contextlib.contextmanager
def local_s3_server(bucket: str) -> Iterator[dict]:
    """A local S3 server (moto's standalone server on 127.0.0.1) with `bucket` made, and the
    AWS environment pointing every client at it while the block runs (restored after); yields
    that environment (for subprocesses). Shared by bench/stream.py and the object-store tests."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # fsspec keeps one S3 filesystem per process, made with the endpoint of its day: a server
    # started after an earlier one (another test module) would be asked at the old port
    _clear_s3_filesystems()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()
        _clear_s3_filesystems()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _clear_s3_filesystems() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
