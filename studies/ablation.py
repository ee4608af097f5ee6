"""What moves AdaSPEC's gap to plain KD? One factor at a time, from the small study's setup.

Each variant changes one thing of AdaSPEC's official arm (k = 0.4, E / k epochs) and is compared
with the plain-KD run trained for as many epochs on the same data (the compute-matched control):

- k in {0.2, 0.6, 0.8} (E / 0.4 epochs each, so every variant has the control's compute);
- `--normalize selected` (paper Eq. 10) instead of all label tokens (the official code);
- `--threshold global` (a running quantile) instead of the micro-batch quantile;
- a stronger reference (`reference=strong`: E / k epochs instead of E);
- the training data: the target's own sampled responses (`--generate`) and the draft's
  (`--generate --generator draft`, on-policy) instead of the dataset's answers, each with its own
  reference and control;
- the draft's depth: 1 and 4 layers instead of 2, each with its own reference and control.

Every run keeps its best epoch on the validation split (offline). Each variant and its control
are measured on the test split, teacher-forced with the target, on the dataset's answers and on
the target's own greedy continuations; the difference comes with its standard error clustered
by sequence. It reuses `studies.paper_table`'s work folder (caches, the seed's runs; the setup
both share is studies/paper_setup.py).

    python -m studies.ablation --task gsm8k --seed 0                     # the committed study
    python -m studies.ablation --task arith --variants k=0.8,depth=1 ... # see studies/README.md
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import harness
from adaspec import runs
from adaspec.build import build_stage
from adaspec.config import Config
from adaspec.evaluate import evaluate
from adaspec.experiment import EVAL_CACHE, ensure_run, split_config
from adaspec.statistics import clustered_difference
from studies import paper_setup
from studies.paper_setup import base_config

VARIANTS = ("k=0.2", "k=0.6", "k=0.8", "normalize=selected", "threshold=global",
            "reference=strong", "data=target", "data=draft", "depth=1", "depth=4")


def _train_cfg(cfg: Config, run: Path, seed: int, **values) -> Config:
    c = dataclasses.replace(cfg.cache, ref_name=values.pop("ref_name", f"ref-s{seed}"))
    t = dataclasses.replace(cfg.train, seed=seed, out=str(run), **values)
    return dataclasses.replace(cfg, train=t, cache=c)


def _setup(args, cfg: Config, work: Path, name: str, seed: int) -> tuple[Config, str | None]:
    """The config a variant trains with (another cache, draft or reference when the variant
    says so, built here) and the name of its own control run (None: the seed's kd_control)."""
    folder = work / "ablation" / name
    e, k = args.epochs, args.k
    ref_name = "ref-" + "".join(ch for ch in name if ch.isalnum())  # a valid --ref-name
    if name.startswith("depth="):
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(
            cfg.models, draft=f"{cfg.models.draft.split('@')[0]}@layers={name.split('=')[1]}"))
    if name.startswith("data="):
        generator = name.split("=")[1]
        root = str(folder / "cache")
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, cache=root))
        gen = split_config(cfg, "train", args.train_rows, root, generate=True,
                           generator=generator, gen_temperature=1.0,
                           gen_max_new_tokens=args.gen_tokens)
        build_stage(gen, "target", progress=args.progress)
        build_stage(split_config(cfg, "validation", args.val_rows, root, **EVAL_CACHE),
                    "target", progress=args.progress)
        cfg = gen
    if name.startswith(("data=", "depth=")):  # its own reference and control
        ref = ensure_run(_train_cfg(cfg, folder / "ref", seed, stage="ref", k=1.0, epochs=e,
                                    ref_name=ref_name), args.progress)
        build_stage(_train_cfg(cfg, ref, seed, stage="ref", ref_name=ref_name), "ref",
                    progress=args.progress)
        ensure_run(_train_cfg(cfg, folder / "control", seed, stage="draft", k=1.0,
                              epochs=e / k, ref_name=ref_name), args.progress)
        return _train_cfg(cfg, folder, seed, ref_name=ref_name), str(folder / "control")
    if name == "reference=strong":
        ref = ensure_run(_train_cfg(cfg, folder / "ref", seed, stage="ref", k=1.0, epochs=e / k,
                                    ref_name=f"{ref_name}-s{seed}"), args.progress)
        build_stage(_train_cfg(cfg, ref, seed, stage="ref", ref_name=f"{ref_name}-s{seed}"),
                    "ref", progress=args.progress)
        return _train_cfg(cfg, folder, seed, ref_name=f"{ref_name}-s{seed}"), None
    return _train_cfg(cfg, folder, seed), None


def run_variant(args, cfg: Config, work: Path, name: str, seed: int) -> dict:
    folder = work / "ablation" / name
    done = folder / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    vcfg, control = _setup(args, cfg, work, name, seed)
    values = {"stage": "draft", "k": args.k, "epochs": args.epochs / args.k}
    if name.startswith("k="):
        values["k"] = float(name.split("=")[1])
    elif name == "normalize=selected":
        values["normalize"] = "selected"
    elif name == "threshold=global":
        values["threshold"] = "global"
    run = ensure_run(dataclasses.replace(vcfg, train=dataclasses.replace(
        vcfg.train, out=str(folder / "adaspec"), **values)), args.progress)
    control = Path(control or work / f"seed-{seed}" / "kd_control")
    test = split_config(cfg, "test", args.test_rows, **EVAL_CACHE)
    drafts = [str(d(r)) for r in (run, control) for d in (runs.model_dir, runs.best_dir)]
    tf = evaluate(test, drafts, ("exact",), progress=args.progress,
                  continuations_cache=str(work / "continuations"), per_token=True)
    out = {"variant": name, "seed": seed, "drafts": drafts, "teacher_forced": tf,
           "best_epoch": runs.read_best(run)["epoch"],
           "control_best_epoch": runs.read_best(control)["epoch"]}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(out))
    return out


def study_result(seed_eval: dict, k: float) -> dict:
    """The study's own AdaSPEC (k = 0.4, E / k epochs) against its control, as a variant row."""
    tf = seed_eval["teacher_forced"]
    index = {arm: 1 + 2 * paper_setup.ARMS.index(arm) for arm in ("adaspec_official",
                                                                   "kd_control")}
    return {"variant": f"the study's AdaSPEC (k={k:g})",
            "teacher_forced": [tf[index["adaspec_official"]], tf[index["adaspec_official"] + 1],
                               tf[index["kd_control"]], tf[index["kd_control"] + 1]],
            "best_epoch": seed_eval["best"]["adaspec_official"]["epoch"],
            "control_best_epoch": seed_eval["best"]["kd_control"]["epoch"]}


def summarize(result: dict) -> dict:
    """AdaSPEC variant minus its control, E-epoch and best-epoch, in each measure."""
    tf = result["teacher_forced"]
    out = {"variant": result["variant"], "best_epoch": result["best_epoch"],
           "control_best_epoch": result["control_best_epoch"]}
    for col, (a, b) in (("E-epoch", (0, 2)), ("best-epoch", (1, 3))):
        for source, measure in (("exact", "expected_acceptance"),
                                ("exact_continuations", "greedy_agreement"),
                                ("exact_continuations", "expected_acceptance")):
            label = f"{col}/{measure}_{'answers' if source == 'exact' else 'continuations'}"
            pa, pb = tf[a][source]["per_token"], tf[b][source]["per_token"]
            out[label] = clustered_difference([pa[measure]], [pb[measure]],
                                                          pa["sequence_lengths"])
            out[label + "/variant"] = tf[a][source][measure]
    return out


def markdown(payload: dict) -> str:
    a = payload["settings"]
    lines = ["# What moves AdaSPEC's gap to plain KD: one factor at a time", "",
             f"{a['task']}, seed {a['seed']}; the setup of docs/paper_table.md (E = {a['epochs']}, "
             f"k = {a['k']}, {a['train_rows']} training rows). Each row: the AdaSPEC variant minus "
             "the plain-KD run of equal compute on the same data (its own control for the data "
             "and depth rows), on the test split, teacher-forced with the target; points (x100), "
             "± standard error clustered by sequence.", "",
             "| variant | column | acc. on answers | greedy agr. on target cont. | "
             "acc. on target cont. | greedy agr. on target cont. (variant / control) | "
             "best epoch (variant / control) |", "|---|---|---|---|---|---|---|"]
    for s in payload["variants"]:
        for col in ("E-epoch", "best-epoch"):
            cells = [f"{s[f'{col}/{m}'][0] * 100:+.2f} ± {s[f'{col}/{m}'][1] * 100:.2f}"
                     for m in ("expected_acceptance_answers", "greedy_agreement_continuations",
                               "expected_acceptance_continuations")]
            key = f"{col}/greedy_agreement_continuations"
            variant = s[key + "/variant"]  # the control's: the variant's minus the difference
            cells.append(f"{variant:.4f} / {variant - s[key][0]:.4f}")
            lines.append(f"| {s['variant']} | {col} | " + " | ".join(cells)
                         + f" | {s['best_epoch']:g} / {s['control_best_epoch']:g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("ablation", __doc__, data=False, progress=True,
                       package="studies")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--gen-tokens", type=int, default=128, help="generated response length")
    # The paper_table settings the work folder was made with (they must agree).
    for flag, kind, default in (("--train-rows", int, 48), ("--val-rows", int, 16),
                                ("--test-rows", int, 16), ("--epochs", float, 2.0),
                                ("--k", float, 0.4), ("--lr", float, 3e-4),
                                ("--batch-size", int, 4), ("--max-length", int, 320),
                                ("--prompts", int, 16), ("--gamma", int, 4),
                                ("--max-new-tokens", int, 48)):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="smollm2-135m@layers=2")
    p.add_argument("--raw-prompts", action="store_true")
    p.add_argument("--work", default="/tmp/adaspec-paper-table")
    p.add_argument("--doc", default=str(harness.REPO / "docs" / "ablation.md"))
    p.add_argument("--report-only", action="store_true",
                   help="re-make the doc from the results JSON (--out)")
    args = p.parse_args(argv)
    if args.report_only:
        payload = json.loads(Path(args.out).read_text())
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(markdown(payload))
        print(f"wrote {args.doc}")
        return 0
    machine = harness.start(args)
    work = Path(args.work) / args.task
    cfg = base_config(args, args.task, work)
    paper_setup.ensure_caches(args, cfg, work)
    seed_eval = paper_setup.run_seed(args, cfg, work, args.seed)  # reference, control
    variants = [summarize(study_result(seed_eval, args.k))] + [
        summarize(run_variant(args, cfg, work, name, args.seed))
        for name in args.variants.split(",")]
    payload = {"benchmark": "ablation", "machine": machine, "settings": vars(args),
               "variants": variants}
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(markdown(payload))
    harness.write_json(args.out, payload)
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
