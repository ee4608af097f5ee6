"""Experiments: several runs over one cache, each made once and reused.

A sweep or a study trains a reference, builds its per-token losses, trains arms from one
config and evaluates drafts from their run folders. This module owns the decisions they share:

- when a run is finished (`runs.is_finished`), resumed (a killed run from its last checkpoint),
  extended (a finished run asked for more epochs: the same training continued) or started over
  (its reference changed since it started: its tokens were selected against another model);
- the reference and its losses (`ensure_reference`: rebuilt when the reference's weights
  changed);
- a target fine-tuned to the task (`ensure_tuned_target`, the paper's first step);
- the evaluation cache's settings (`EVAL_CACHE`) and the split configs built from a run's
  config (`split_config`, `continuations_config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from adaspec import models, provenance, runs
from adaspec.build import build_stage
from adaspec.config import Config
from adaspec.train import train
from cache_tools import schema

# Evaluation caches (validation/test rows, the target's continuations): a dense enough top-k in
# float16, so a teacher-forced acceptance is exact to float16 over the target's likely ids.
EVAL_CACHE = {"sparse": "topk", "topk": 64, "value_encoding": "float16"}


def split_config(cfg: Config, split: str, limit: int, cache: str | None = None,
                 **cache_values) -> Config:
    """`cfg` on another split of its task (`limit` rows), optionally another cache folder and
    cache settings."""
    data = dataclasses.replace(cfg.data, split=split, limit=limit)
    c = dataclasses.replace(cfg.cache, cache=cache or cfg.cache.cache, **cache_values)
    return dataclasses.replace(cfg, data=data, cache=c)


def continuations_config(cfg: Config, split: str, limit: int, cache: str,
                         max_new_tokens: int) -> Config:
    """The evaluation cache of the target's greedy continuations of `split`'s prompts."""
    return split_config(cfg, split, limit, cache, generate=True, gen_temperature=0.0,
                        gen_max_new_tokens=max_new_tokens, **EVAL_CACHE)


def ensure_run(cfg: Config, progress: bool, reference: dict | None = None) -> Path:
    """Train the run `cfg.train.out` unless it is finished at this length; resume a killed one
    (train restarts one killed before its first checkpoint), extend a finished shorter one
    (`--epochs` raised: the same training continued; a constant rate continues exactly), and
    start over one whose reference (`reference`, a model identity) changed since it started."""
    run = Path(cfg.train.out)
    if reference is not None and (run / runs.CONFIG_FILE).is_file():
        recorded = runs.read_config(run).get("reference") or {}
        if recorded.get("weight_hash") != reference.get("weight_hash"):
            runs.discard_run(run)  # its tokens were selected against another reference
    if runs.is_finished(run, cfg.train.run_epochs):
        return run
    train(cfg, resume=runs.latest_checkpoint(run) is not None, progress=progress)
    return run


def ensure_reference(cfg: Config, progress: bool, losses: bool = True,
                     expected_hash: str | None = None) -> tuple[Path, dict]:
    """The reference run `cfg.train.out` (trained, resumed or reused by `ensure_run`) and its
    model identity; with `losses`, its per-token losses in `cfg`'s training cache, rebuilt when
    they were computed by other weights (the reference was extended or retrained).
    `expected_hash`: the weight hash a record already holds for it (a retrained reference must
    be the same model, or arms selected against the two would not be comparable)."""
    ref = ensure_run(cfg, progress)
    identity = models.model_identity(str(runs.model_dir(ref)))
    if expected_hash is not None and expected_hash != identity["weight_hash"]:
        raise SystemExit(
            f"{ref}: the reference trained again is not the one recorded (weight hash "
            f"{identity['weight_hash'][:12]}, recorded {expected_hash[:12]}): an arm selecting "
            "against it would not be comparable; start over with another output folder")
    if not losses:
        return ref, identity
    ref_cfg = dataclasses.replace(cfg, models=dataclasses.replace(
        cfg.models, ref=str(runs.model_dir(ref))))
    reader = provenance.open_split(cfg)
    stage = reader.manifest.stage(schema.ref_group_name(cfg.cache.ref_name))
    stale = stage is not None and (stage.params.get("model") or {}).get("weight_hash") != \
        identity["weight_hash"]
    build_stage(ref_cfg, "ref", progress=progress, rebuild=stale)
    return ref, identity


def ensure_tuned_target(cfg: Config, out: Path, lr: float, epochs: float,
                        progress: bool) -> str:
    """The target of `cfg` fine-tuned on `cfg`'s training rows (stage sft, online: no cache
    needed), as the paper's recipe starts; returns its model folder (`cfg.models.target`
    itself when `epochs` is 0)."""
    if epochs == 0:
        return cfg.models.target
    t = dataclasses.replace(cfg.train, stage="sft", lr=lr, epochs=epochs, online=True,
                            out=str(out), eval_split=None, eval_cache=None, keep_best=False,
                            checkpoint_every=25, draft_vocab=None)
    ensure_run(dataclasses.replace(cfg, train=t), progress)
    return str(runs.model_dir(out))
