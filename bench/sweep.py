"""What a sweep of drafts costs from the cache, online, and in one shared pass over the data.

One process, one work folder, one run; every measure below runs in it:

- setup (paid once, timed apart): the target cache of the train split and of a small test split
  (`build_stage(cfg, "target")`), the reference (`train(stage="ref")`, k = 1, from the cache)
  and its stage of per-token losses (`build_stage(cfg, "ref")`).
- cached: `run_sweep` over k in --ks, one variant after the other (train from the cache, then
  evaluate each draft offline on the test cache, write the tables and plots).
- online: the same variants through `train.train` with `train.online=True` (the target and the
  reference run live, `models.ref` pointing at the trained reference), same hyperparameters,
  same data order; then the same offline evaluation (`sweep.evaluate_variant`), tables and plots
  as `run_sweep`.
- single pass: `run_sweep(..., single_pass=True)` into a fresh folder: every draft steps on each
  micro-batch read once. Its drafts are compared with the one-by-one drafts weight by weight
  (they should be equal); the online drafts are compared with the cached ones too (they differ
  by what the top-K + tail cache and its float16 values change in the gradients).

Other jobs on the machine come and go over minutes, so the sweeps are interleaved: each variant's
cached and online runs go side by side (`run_sweep`/the online mirror over that one variant,
order alternated), the single pass runs mid-way, and each sweep ends with its call over all
variants, which trains nothing (finished variants are skipped) and writes the sweep's tables.
A sweep's wall time is the sum of its calls; process CPU time is given too.

Ratios: online / cached; online / (cached + the setup only the cache needs: both target-cache
and ref-stage builds of the train split), with the break-even number of variants; single pass /
one by one. The reference training and the test cache serve both routes and are not charged to
the cache. Where the time goes is measured by wrapping public names the runs call (model loads,
the target and reference forwards (`labels.LabelLogits`), the draft's forward+loss, backward,
waiting for batches, checkpoints, offline evaluation); "other" is the rest (mostly the optimizer
step). Commands: bench/README.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import harness
from adaspec import build, labels, models, runs, step, stream, sweep, teacher_forced, train
from adaspec.config import build_config
from bench import instruments
from cache_tools import schema
from cache_tools.store import CacheReader

MODES = ("cached", "online", "single_pass")
SETUP_TRAIN_TARGET = "setup: target cache, train split"
SETUP_TEST_TARGET = "setup: target cache, test split"
SETUP_REF_TRAIN = "setup: reference training"
SETUP_REF_STAGE = "setup: ref stage, train split"
EVALUATION_PIECES = ("offline evaluation", "load trained draft", "tables + plots")


# ---------------------------------------------------------------------------------------------
# Timing: phases of the run, and the pieces of each phase


class Phases:
    """Wall, CPU time, other processes' load and the timed pieces of each phase of the run; a
    phase may run in several segments (they add up), each also kept on its own."""

    def __init__(self, timers: harness.Timers):
        self.timers = timers
        self.phases: dict[str, dict] = {}

    @contextlib.contextmanager
    def phase(self, name: str, label: str = ""):
        self.timers.take()  # pieces outside every phase are dropped
        with harness.measure() as span:
            yield
        seconds, calls = self.timers.take()
        segment = {"label": label, **span.as_dict()}
        p = self.phases.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0,
                                          "others_cpu_seconds": 0.0, "segments": [],
                                          "pieces": {}, "calls": {}})
        for key in ("seconds", "cpu_seconds", "others_cpu_seconds"):
            p[key] += segment[key]
        p["others_cores"] = p["others_cpu_seconds"] / max(p["seconds"], 1e-9)
        p["segments"].append(segment)
        for piece, s in seconds.items():
            p["pieces"][piece] = p["pieces"].get(piece, 0.0) + s
            p["calls"][piece] = p["calls"].get(piece, 0) + calls[piece]
        print(f"  {name}{' ' + label if label else ''}: {span.seconds:.1f} s (other processes: "
              f"{span.others_cores:.2f} cores)", flush=True)


def instrumented(timers: harness.Timers, role_of):
    """Patches of what the runs call, timed; `role_of(spec)` names a model load."""
    roles: dict[int, str] = {}  # id(loaded model) -> its role, for the target/ref forwards
    load = models.load_model

    def load_model(spec, *args, **kwargs):
        role = role_of(str(spec))
        start = time.perf_counter()
        loaded = load(spec, *args, **kwargs)
        timers.add(f"load {role}", time.perf_counter() - start)
        roles[id(loaded[0])] = role
        return loaded

    def forward_piece(model) -> str | None:
        role = roles.get(id(model))
        return f"{role} forward" if role in ("target", "reference") else None

    def batches(self, *args, **kwargs):
        inner = original_batches(self, *args, **kwargs)

        def timed():
            # Reading runs in the prefetch thread: what the loop sees is its wait for a batch.
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    finally:
                        timers.add("waiting for batches", time.perf_counter() - start)
                    yield item
            finally:
                inner.close()

        return timed()

    original_batches = stream.BatchStream.batches
    return harness.patched(
        (models, "load_model", load_model),
        (labels, "LabelLogits", instruments.timed_label_logits(timers, forward_piece)),
        (step.LossModel, "forward", timers.wrap("draft forward + loss", step.LossModel.forward)),
        (torch.Tensor, "backward", timers.wrap("draft backward", torch.Tensor.backward)),
        (stream.BatchStream, "batches", batches),
        (runs, "save_checkpoint", timers.wrap("checkpoint (accelerate state)",
                                              runs.save_checkpoint)),
        (models, "save_model", timers.wrap("save model", models.save_model)),
        (teacher_forced, "offline_acceptance", timers.wrap("offline evaluation",
                                                     teacher_forced.offline_acceptance)),
        (sweep, "write_tables", timers.wrap("tables + plots", sweep.write_tables)),
        (sweep, "plot_results", timers.wrap("tables + plots", sweep.plot_results)),
    )


# ---------------------------------------------------------------------------------------------
# The online sweep (run_sweep's one-by-one path with online=True) and the weight checks


def online_sweep(cfg, variants, out: Path, eval_split: str, ref_model: str,
                 progress: bool) -> list[dict]:
    """`run_sweep(cfg, variants, out, eval_split)` step for step (finished variants skipped),
    each variant trained with online=True and `models.ref` = the trained reference."""
    eval_reader = CacheReader(cfg.cache.cache, cfg.data.task, eval_split)
    todo = [v for v in variants if not (out / v.name / sweep.RESULT_FILE).exists()]
    seconds = {}
    for v in todo:
        vcfg = sweep.variant_config(cfg, v, out / v.name)  # sets online=False: switched on here
        vcfg = dataclasses.replace(
            vcfg, models=dataclasses.replace(vcfg.models, ref=ref_model),
            train=dataclasses.replace(vcfg.train, online=True))
        started = time.perf_counter()
        train.train(vcfg, progress=progress)
        seconds[v.name] = time.perf_counter() - started
    for v in todo:
        sweep.evaluate_variant(cfg, v, out / v.name, eval_reader, seconds[v.name], progress)
    rows = [json.loads((out / v.name / sweep.RESULT_FILE).read_text()) for v in variants]
    sweep.write_tables(rows, out)
    sweep.plot_results(rows, out)
    return rows


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(runs.model_dir(run_dir).glob("*.safetensors")):
        found.update(load_file(path))
    if not found:
        raise SystemExit(f"no safetensors weights in {runs.model_dir(run_dir)}")
    return found


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise SystemExit(f"the drafts hold different tensors: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def weight_checks(args, variants, work: Path) -> tuple[dict, dict, float]:
    """(single pass and online vs cached per variant, how far training moved each cached draft
    from its initialisation (the scale), the initialisation's load seconds)."""
    diffs = {}
    for v in variants:
        cached = weights(work / "cached" / v.name)
        diffs[v.name] = {
            "single_pass_vs_cached": max_abs_diff(weights(work / "single_pass" / v.name), cached),
            "online_vs_cached": max_abs_diff(weights(work / "online" / v.name), cached),
        }
    started = time.perf_counter()
    init = models.load_model(args.draft)[0].state_dict()
    init_load_seconds = time.perf_counter() - started
    update_scale = {}
    for v in variants:
        trained = weights(work / "cached" / v.name)
        update_scale[v.name] = max_abs_diff(trained, {k: init[k] for k in trained})
    return diffs, update_scale, init_load_seconds


# ---------------------------------------------------------------------------------------------
# The steps of the run


def parse_args(argv: list[str] | None):
    p = harness.parser("sweep", __doc__, progress=True)
    p.add_argument("--target", default="smollm2-135m", help="target spec (alias, dir, gguf)")
    p.add_argument("--draft", default="smollm2-135m@layers=2",
                   help="draft initialisation (the reference starts from it too)")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--limit", type=int, default=24, help="train rows (default 24)")
    p.add_argument("--test-limit", type=int, default=12, help="test rows (default 12)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--ks", default="0.4,0.7,1.0", help="comma list of k (default 0.4,0.7,1.0)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs of every variant")
    p.add_argument("--ref-epochs", type=float, default=1.0, help="epochs of the reference")
    p.add_argument("--loss", default="fkl", choices=["fkl", "rkl", "tvd", "jsd"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help="folder for the caches and runs (default: a temp folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temp work folder")
    return p.parse_args(argv)


def work_folder(args) -> Path:
    if not args.workdir:
        return Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    work = Path(args.workdir)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--workdir {work} is not empty; every measure needs fresh folders")
    work.mkdir(parents=True, exist_ok=True)
    return work


def configs(args, work: Path) -> tuple:
    """(train-split config, test-split config, reference training config, variants)."""
    train_values = {"batch_size": args.batch_size, "epochs": args.epochs, "loss": args.loss,
                    "seed": args.seed}
    if args.lr is not None:
        train_values["lr"] = args.lr
    cfg = build_config({
        "models": {"target": args.target, "draft": args.draft},
        "data": {"task": args.task, "split": "train", "data_files": args.data_files,
                 "limit": args.limit, "max_length": args.max_length},
        "cache": {"cache": str(work / "cache"), "topk": args.topk, "sparse": "topk",
                  "value_encoding": "float16"},
        "train": train_values,
    })
    test_cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, split="test", limit=args.test_limit))
    ref_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, stage="ref", k=1.0, epochs=args.ref_epochs, out=str(work / "ref")))
    ks = [float(x) for x in args.ks.split(",") if x.strip()]
    return cfg, test_cfg, ref_cfg, sweep.grid(ks, [args.epochs], [args.loss], [args.seed])


def run_all(args, cfgs: tuple, work: Path, phases: Phases) -> tuple[dict, dict, dict]:
    """Setup, then the cached and online sweeps interleaved with the single pass mid-way;
    (result rows per mode, train-split counts, test-split counts)."""
    cfg, test_cfg, ref_cfg, variants = cfgs
    ref_model = runs.model_dir(work / "ref")
    progress, n = args.progress, len(variants)
    print("setup (paid once):")
    with phases.phase(SETUP_TRAIN_TARGET):
        build.build_stage(cfg, "target", progress=progress)
    with phases.phase(SETUP_TEST_TARGET):
        test_manifest = build.build_stage(test_cfg, "target", progress=progress)
    with phases.phase(SETUP_REF_TRAIN):
        train.train(ref_cfg, progress=progress)
    with phases.phase(SETUP_REF_STAGE):
        manifest = build.build_stage(cfg, "ref", progress=progress)
    # The machine's load drifts over minutes: the cached and the online run of each variant go
    # side by side (order alternated), and the single pass runs mid-way. A sweep finishes with a
    # call over all variants that trains nothing (finished variants are skipped) and writes the
    # sweep's tables and plots.
    print(f"sweeps over k = {args.ks} ({n} variants), cached and online interleaved:")

    def one(mode: str, chosen: list, label: str) -> list[dict]:
        with phases.phase(mode, label):
            if mode == "online":
                return online_sweep(cfg, chosen, work / mode, "test", str(ref_model), progress)
            return sweep.run_sweep(cfg, chosen, work / mode, "test",
                                   single_pass=mode == "single_pass", progress=progress)

    rows: dict[str, list[dict]] = {}
    for i, v in enumerate(variants):
        for mode in harness.rotated(["cached", "online"], i):
            one(mode, [v], v.name)
        if i == (n - 1) // 2:
            rows["single_pass"] = one("single_pass", variants, "all variants")
    for mode in ("cached", "online"):
        rows[mode] = one(mode, variants, "all variants (nothing to train: tables)")
    return (rows, manifest.stages[schema.SEQUENCES].counts,
            test_manifest.stages[schema.SEQUENCES].counts)


def summarize(ph: dict, variants: list, diffs: dict, total_seconds: float) -> dict:
    """The ratios (see the module docstring)."""
    n = len(variants)
    wall = {m: ph[m]["seconds"] for m in MODES}
    cache_only_setup = ph[SETUP_TRAIN_TARGET]["seconds"] + ph[SETUP_REF_STAGE]["seconds"]
    shared_setup = ph[SETUP_TEST_TARGET]["seconds"] + ph[SETUP_REF_TRAIN]["seconds"]
    extra = (wall["online"] - wall["cached"]) / n
    train_part = {m: wall[m] - sum(ph[m]["pieces"].get(p, 0.0) for p in EVALUATION_PIECES)
                  for m in MODES}
    # Per variant, the cached and the online run went side by side: one ratio each.
    pair_ratios = {}
    for v in variants:
        got = {m: sum(seg["seconds"] for seg in ph[m]["segments"] if seg["label"] == v.name)
               for m in ("cached", "online")}
        pair_ratios[v.name] = got["online"] / got["cached"]
    return {
        "variants": n,
        "online_over_cached": wall["online"] / wall["cached"],
        "online_over_cached_with_cache_setup": wall["online"] / (wall["cached"]
                                                                  + cache_only_setup),
        "break_even_variants": cache_only_setup / extra if extra > 0 else math.inf,
        "online_over_cached_per_variant": pair_ratios,
        "online_over_cached_training_only": train_part["online"] / train_part["cached"],
        # Process CPU time is less sensitive than wall time to other jobs on a shared machine.
        "online_over_cached_cpu": ph["online"]["cpu_seconds"] / ph["cached"]["cpu_seconds"],
        "single_pass_over_one_by_one": wall["single_pass"] / wall["cached"],
        "single_pass_over_one_by_one_cpu":
            ph["single_pass"]["cpu_seconds"] / ph["cached"]["cpu_seconds"],
        "single_pass_over_one_by_one_training_only":
            train_part["single_pass"] / train_part["cached"],
        "max_abs_weight_diff_single_pass_vs_one_by_one":
            max(d["single_pass_vs_cached"] for d in diffs.values()),
        "max_abs_weight_diff_online_vs_cached":
            max(d["online_vs_cached"] for d in diffs.values()),
        "cache_only_setup_seconds": cache_only_setup,
        "shared_setup_seconds": shared_setup,
        "total_seconds": total_seconds,
    }


def print_phases_and_ratios(ph: dict, summary: dict, n: int) -> None:
    phase_rows = []
    for name, p in ph.items():
        loads = sum(s for piece, s in p["pieces"].items() if piece.startswith("load "))
        per = p["seconds"] / n if name in MODES else ""
        phase_rows.append([name, p["seconds"], p["cpu_seconds"], per, loads, p["others_cores"]])
    print()
    print(harness.format_table(["phase", "wall s", "CPU s", "per variant s",
                                "of which model loads s", "others' cores"], phase_rows))
    ratio_rows = [
        ["online / cached (sweep wall time)", summary["online_over_cached"]],
        *[[f"  {name}: online / cached side by side", r]
          for name, r in summary["online_over_cached_per_variant"].items()],
        ["online / (cached + cache-only setup)", summary["online_over_cached_with_cache_setup"]],
        ["  break-even: variants for the cache to pay off", summary["break_even_variants"]],
        ["online / cached, training only (evaluation excluded)",
         summary["online_over_cached_training_only"]],
        ["online / cached, process CPU time", summary["online_over_cached_cpu"]],
        ["single pass / one by one (sweep wall time)", summary["single_pass_over_one_by_one"]],
        ["single pass / one by one, training only",
         summary["single_pass_over_one_by_one_training_only"]],
        ["single pass / one by one, process CPU time", summary["single_pass_over_one_by_one_cpu"]],
        ["max |weight diff| single pass vs one by one",
         summary["max_abs_weight_diff_single_pass_vs_one_by_one"]],
        ["max |weight diff| online vs cached", summary["max_abs_weight_diff_online_vs_cached"]],
    ]
    print()
    print(harness.format_table(["ratio", "value"],
                               [[a, f"{b:.3e}" if "diff" in a else b] for a, b in ratio_rows]))


def print_pieces_and_variants(ph: dict, rows: dict, variants: list, diffs: dict,
                              update_scale: dict) -> None:
    wall = {m: ph[m]["seconds"] for m in MODES}
    pieces = sorted({piece for m in MODES for piece in ph[m]["pieces"]},
                    key=lambda piece: -max(ph[m]["pieces"].get(piece, 0.0) for m in MODES))
    piece_rows = [[piece] + [ph[m]["pieces"].get(piece, 0.0) for m in MODES] for piece in pieces]
    piece_rows.append(["other (optimizer step, clipping, setup, logging)"]
                      + [wall[m] - sum(ph[m]["pieces"].values()) for m in MODES])
    piece_rows.append(["sweep wall time"] + [wall[m] for m in MODES])
    print()
    print(harness.format_table(["where the time goes (s)", *MODES], piece_rows))
    variant_rows = []
    for i, v in enumerate(variants):
        r = {m: rows[m][i] for m in MODES}
        variant_rows.append([v.name] + [r[m]["alpha_mid"] for m in MODES]
                            + [r["cached"]["final_train_loss"], r["online"]["final_train_loss"],
                               f"{diffs[v.name]['single_pass_vs_cached']:.2e}",
                               f"{diffs[v.name]['online_vs_cached']:.2e}",
                               f"{update_scale[v.name]:.2e}"])
    print()
    print(harness.format_table(["variant", "alpha cached", "alpha online", "alpha 1-pass",
                                "loss cached", "loss online", "|dW| 1-pass", "|dW| online",
                                "|W - W init|"], variant_rows))


WHAT = {
    "setup": "build_stage target (train, test splits), train stage=ref k=1 from the cache, "
             "build_stage ref (train split); each a phase",
    "cached": "run_sweep(cfg, variants, out, 'test') one by one: train + offline evaluation + "
              "tables/plots",
    "online": "the same variants via train.train with train.online=True and models.ref = the "
              "trained reference, then the same evaluation, tables and plots",
    "single_pass": "run_sweep(..., single_pass=True) into a fresh folder",
    "cache_only_setup": "target-cache and ref-stage builds of the train split (the reference "
                        "training and the test cache serve both routes)",
    "break_even_variants": "cache_only_setup / (online - cached seconds per variant)",
    "training_only": "phase wall time minus offline evaluation, trained-draft loads and "
                     "tables/plots",
    "pieces": "seconds inside wrapped calls; 'waiting for batches' is the loop's wait on the "
              "prefetch thread; 'draft backward' is every Tensor.backward; 'target forward' and "
              "'reference forward' are labels.LabelLogits of those models (online teachers, "
              "and the builds in setup)",
    "weight_diffs": "max |w_a - w_b| over every tensor of model.safetensors; update_scale = "
                    "max |w_cached - w_init| (the draft initialisation)",
    "others_cores": "CPU seconds of other processes per wall second (/proc/stat)",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = harness.start(args)
    work = work_folder(args)
    print(f"work folder {work}")
    cfgs = configs(args, work)
    cfg, variants = cfgs[0], cfgs[3]
    ref_model = runs.model_dir(work / "ref")

    def role_of(spec: str) -> str:
        if spec == cfg.models.target:
            return "target"
        if spec == cfg.models.draft:
            return "draft init"
        if Path(spec).exists() and Path(spec).resolve() == ref_model.resolve():
            return "reference"
        return "trained draft"

    timers = harness.Timers()
    phases = Phases(timers)
    started = time.perf_counter()
    try:
        with instrumented(timers, role_of):
            rows, counts, test_counts = run_all(args, cfgs, work, phases)
        total_seconds = time.perf_counter() - started
        diffs, update_scale, init_load_seconds = weight_checks(args, variants, work)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ph = phases.phases
    summary = summarize(ph, variants, diffs, total_seconds)
    print(f"\n{cfg.data.task}: train {counts}, test {test_counts}; target {args.target}, draft "
          f"{args.draft}, K={args.topk}, batch {args.batch_size}, {args.epochs:g} epoch(s), "
          f"torch threads {torch.get_num_threads()}")
    print_phases_and_ratios(ph, summary, len(variants))
    print_pieces_and_variants(ph, rows, variants, diffs, update_scale)
    print(f"\nonline/cached {summary['online_over_cached']:.2f}x; with the cache-only setup "
          f"amortised over {len(variants)} variants "
          f"{summary['online_over_cached_with_cache_setup']:.2f}x (break-even at "
          f"{summary['break_even_variants']:.1f} variants); single pass / one by one "
          f"{summary['single_pass_over_one_by_one']:.2f}x")
    harness.write_json(args.out, {
        "benchmark": "sweep",
        "what": WHAT,
        "machine": info,
        "settings": {**vars(args), "config": cfg.to_dict(),
                     "variants": [v.name for v in variants]},
        "data": {"train": counts, "test": test_counts},
        "summary": summary,
        "phases": ph,
        "results": rows,
        "weight_diffs": diffs,
        "update_scale": update_scale,
        "init_draft_load_seconds": init_load_seconds,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
