"""Summary of a cache: what it holds, how complete each stage is, and what it costs on disk."""

from __future__ import annotations

import numpy as np

from cache_tools import schema, store
from cache_tools.manifest import Manifest


def _stage_bytes(group, stage: str) -> tuple[int, int]:
    """(stored bytes, uncompressed bytes) of a stage's arrays."""
    stored = raw = 0
    sub = group[stage]
    for name in sub.array_keys():
        array = sub[name]
        stored += array.nbytes_stored()
        raw += int(np.prod(array.shape)) * array.dtype.itemsize
    return stored, raw


def cache_summary(root: str) -> list[dict]:
    """One record per `<task>/<split>` with its stages, counts and sizes."""
    root_group = store.open_root(root, mode="r")
    records = []
    for path in store.list_splits(root_group):
        group = root_group[path]
        manifest = Manifest.read(group)
        sequences = manifest.stage(schema.SEQUENCES)
        counts = sequences.counts if sequences else {}
        n_label = max(int(counts.get("label_tokens", 0)), 1)
        record = {"split": path, "counts": counts, "stages": []}
        for stage, entry in manifest.stages.items():
            stored, raw = _stage_bytes(group, stage) if stage in group else (0, 0)
            params = entry.params
            record["stages"].append(
                {
                    "stage": stage,
                    "status": entry.status,
                    "mode": params.get("mode"),
                    "k": params.get("k"),
                    "model": (params.get("model") or {}).get("spec"),
                    "bytes": stored,
                    "bytes_per_label_token": stored / n_label,
                    "compression_ratio": raw / stored if stored else None,
                }
            )
        records.append(record)
    return records


def format_summary(root: str, records: list[dict]) -> str:
    lines = [f"cache {root}"]
    if not records:
        lines.append("  (empty)")
    for rec in records:
        c = rec["counts"]
        lines.append(
            f"  {rec['split']}: {c.get('sequences', 0)} sequences, {c.get('tokens', 0)} tokens, "
            f"{c.get('label_tokens', 0)} label tokens"
        )
        for st in rec["stages"]:
            extra = f" mode={st['mode']} K={st['k']}" if st["k"] else ""
            model = f" model={st['model']}" if st["model"] else ""
            ratio = f" ratio {st['compression_ratio']:.2f}x" if st["compression_ratio"] else ""
            lines.append(
                f"    {st['stage']:<12} {st['status']:<9}{extra}{model}  "
                f"{st['bytes'] / 1e6:.2f} MB, "
                f"{st['bytes_per_label_token']:.1f} B/label token{ratio}"
            )
    return "\n".join(lines)
