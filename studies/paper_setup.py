"""The small study's setup (docs/paper_table.md): its tasks' data, arms, configs, caches and
one seed's four arms trained and measured. Not a study: `paper_table` and `ablation` both run
on it, and no study imports another."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import harness
from adaspec import runs
from adaspec.build import build_stage
from adaspec.config import Config, build_config
from adaspec.evaluate import evaluate
from adaspec.experiment import EVAL_CACHE, continuations_config, ensure_run, split_config
from adaspec.validation import validation_records

ARMS = ("distillspec", "adaspec_official", "adaspec_equal", "kd_control")
ARM_NAMES = {
    "distillspec": "DistillSpec (ref, k=1, E epochs)",
    "adaspec_official": "AdaSPEC k=0.4, E/k epochs (official)",
    "adaspec_equal": "AdaSPEC k=0.4, E epochs",
    "kd_control": "plain KD k=1, E/k epochs (compute-matched)",
}

# ---------------------------------------------------------------------------------------------
# Configs


def base_config(args, task: str, work: Path) -> Config:
    return build_config({
        "models": {"target": args.target, "draft": args.draft},
        "data": {"task": task, "data_files": harness.task_data(task),
                 "max_length": args.max_length,
                 "chat_template": not args.raw_prompts, "limit": args.train_rows},
        "cache": {"cache": str(work / "cache")},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "weight_decay": 0.1,
                  "lr_schedule": "constant", "eval_split": "validation", "keep_best": True},
        "eval": {"gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
                 "prompts": args.prompts, "speed": False},
    })


def arm_config(cfg: Config, arm: str, seed: int, epochs: float, k: float, run: Path) -> Config:
    official = arm in ("adaspec_official", "kd_control")
    t = dataclasses.replace(
        cfg.train, stage="ref" if arm == "distillspec" else "draft",
        k=1.0 if arm in ("distillspec", "kd_control") else k, seed=seed,
        epochs=epochs / k if official else epochs, out=str(run))
    c = dataclasses.replace(cfg.cache, ref_name=f"ref-s{seed}")
    return dataclasses.replace(cfg, train=t, cache=c)


# ---------------------------------------------------------------------------------------------
# Steps (each skipped when its output exists)


def ensure_caches(args, cfg: Config, work: Path) -> None:
    build_stage(cfg, "target", progress=args.progress)  # train: the default cache
    build_stage(split_config(cfg, "validation", args.val_rows, **EVAL_CACHE), "target",
                progress=args.progress)
    build_stage(split_config(cfg, "test", args.test_rows, **EVAL_CACHE), "target",
                progress=args.progress)
    # The target's own greedy continuations of the test prompts (what decoding sees).
    build_stage(continuations_config(cfg, "test", args.test_rows, str(work / "continuations"),
                                     args.max_new_tokens), "target", progress=args.progress)


def run_seed(args, cfg: Config, work: Path, seed: int) -> dict:
    """The four arms of one seed, trained and measured (cached in work/seed-N/eval.json)."""
    folder = work / f"seed-{seed}"
    done = folder / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    arm_runs = {arm: folder / arm for arm in ARMS}
    ref = ensure_run(arm_config(cfg, "distillspec", seed, args.epochs, args.k,
                                arm_runs["distillspec"]), args.progress)
    ref_cfg = arm_config(cfg, "distillspec", seed, args.epochs, args.k, ref)
    build_stage(dataclasses.replace(ref_cfg, models=dataclasses.replace(
        cfg.models, ref=str(runs.model_dir(ref)))), "ref", progress=args.progress)
    for arm in ARMS[1:]:
        ensure_run(arm_config(cfg, arm, seed, args.epochs, args.k, arm_runs[arm]), args.progress)
    test = split_config(cfg, "test", args.test_rows, **EVAL_CACHE)
    drafts = [args.draft] + [str(d(arm_runs[a])) for a in ARMS
                             for d in (runs.model_dir, runs.best_dir)]
    teacher_forced = evaluate(test, drafts, ("offline", "exact"), progress=args.progress,
                              continuations_cache=str(work / "continuations"), per_token=True)
    decoding = evaluate(test, [args.draft] + [str(runs.best_dir(arm_runs[a])) for a in ARMS],
                        ("speculative",), progress=args.progress)
    out = {"seed": seed, "drafts": drafts, "teacher_forced": teacher_forced,
           "decoding": decoding,
           "validation": {arm: validation_records(arm_runs[arm]) for arm in ARMS},
           "best": {arm: runs.read_best(arm_runs[arm])
                    for arm in ARMS}}
    done.write_text(json.dumps(out))
    return out
