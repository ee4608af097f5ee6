"""Does selective distillation pay off? The AdaSPEC paper's Table 1 protocol, from the cache.

Per task (rows from ../shared/data; train, validation and test rows carved from the file by the
task's split rule, never ../shared/holdout) and per seed, on the embedded pair (SmolLM2-135M
target, its first 2 layers as the draft, the target prompted with its chat template: an
instruct model speaks the task that way, see the quality table):

- DistillSpec baseline: the reference itself, plain forward-KL KD (k = 1) for E epochs;
- AdaSPEC k = 0.4 for E / k epochs (the official scripts: equal selected-token updates) and for
  E epochs (equal passes), against the baseline's stored per-token losses;
- a compute-matched control: plain KD (k = 1) for E / k epochs.

Every run measures its draft on the validation split after each epoch (offline, from the
cache) and keeps its best epoch: "E-epoch" columns are the final models, "best-epoch" ones the
kept models. On the test split each draft is measured teacher-forced over the full vocabulary
with the target (on the dataset's answers and on the target's own greedy continuations, which
is what speculative decoding sees), and by real greedy speculative decoding (gamma 4) on the
test prompts: the paper's alpha and the mean accepted length. Differences between arms come
with paired standard errors clustered by sequence (tokens) or prompt (decoding), seeds pooled.

    python -m studies.paper_table --tasks gsm8k,alpaca,xsum     # the committed study (hours)
    python -m studies.paper_table --tasks arith --seeds 0 --train-rows 8 --val-rows 4 \\
        --test-rows 4 --prompts 2 --epochs 1 --work /tmp/pt-smoke --out /tmp/pt-smoke/p.json \\
        --doc /tmp/pt-smoke/p.md                               # smoke

Work goes to --work; a re-run reuses finished caches, runs and evaluations, so an interrupted
study continues. `--report-only` re-makes the table from the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import harness
from adaspec import models, quality
from adaspec.config import Config
from adaspec.experiment import split_config
from adaspec.statistics import clustered_difference, prompt_difference
from cache_tools.store import CacheReader
from studies.decision_rule import verdict_sentence
from studies.paper_setup import ARM_NAMES, ARMS, base_config, ensure_caches, run_seed

# The paper's Table 1 (official README, Pythia-31M -> 1.4B, acceptance rate alpha in %):
# (DistillSpec, AdaSPEC) after 3 epochs and at each model's optimal epoch.
PAPER = {
    "gsm8k": {"3-epoch": (57.58, 61.02), "optimal-epoch": (66.19, 68.28)},
    "alpaca": {"3-epoch": (44.34, 47.25), "optimal-epoch": (65.41, 65.79)},
    "mbpp": {"3-epoch": (46.88, 47.73), "optimal-epoch": (49.88, 65.12)},
    "cnn_dailymail": {"3-epoch": (73.05, 74.22), "optimal-epoch": (80.15, 80.89)},
    "xsum": {"3-epoch": (47.24, 49.11), "optimal-epoch": (56.11, 57.80)},
}


# ---------------------------------------------------------------------------------------------
# The target's quality


def target_quality(args, cfg: Config, work: Path) -> dict:
    path = work / "quality.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = models.load_model(args.target)
    model.eval()
    out = {}
    for name, chat in (("raw prompts", False), ("chat template", True)):
        if chat and not getattr(tokenizer, "chat_template", None):
            continue  # a tokenizer without one (the smoke test's tiny model)
        qcfg = split_config(cfg, "test", args.test_rows)
        qcfg = dataclasses.replace(qcfg, data=dataclasses.replace(qcfg.data, chat_template=chat))
        out[name] = quality.target_quality(qcfg, model, tokenizer, args.quality_prompts,
                                           args.quality_tokens, progress=args.progress)
    path.write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# Statistics


def summarize_task(seeds: list[dict]) -> dict:
    """Per arm and column: means over seeds; AdaSPEC minus baseline and minus control."""
    def tf(seed: dict, arm: str, col: str, source: str) -> dict:
        index = 1 + 2 * ARMS.index(arm) + (0 if col == "model" else 1)  # see run_seed
        return seed["teacher_forced"][index][source]

    def dec(seed: dict, arm: str) -> dict:
        return seed["decoding"][1 + ARMS.index(arm)]["speculative"]

    table: dict = {"arms": {}, "differences": {}}
    for arm in ARMS:
        for col in ("model", "best"):
            key = f"{arm}/{'E-epoch' if col == 'model' else 'best-epoch'}"
            row = {
                "exact_acceptance_answers": _mean(tf(s, arm, col, "exact")["expected_acceptance"]
                                                  for s in seeds),
                "greedy_agreement_answers": _mean(tf(s, arm, col, "exact")["greedy_agreement"]
                                                  for s in seeds),
                "greedy_agreement_continuations": _mean(
                    tf(s, arm, col, "exact_continuations")["greedy_agreement"] for s in seeds),
                "exact_acceptance_continuations": _mean(
                    tf(s, arm, col, "exact_continuations")["expected_acceptance"]
                    for s in seeds),
            }
            if col == "best":
                row["alpha_paper"] = _mean(dec(s, arm)["alpha_paper"] for s in seeds)
                row["mean_accepted_length"] = _mean(dec(s, arm)["mean_accepted_length"]
                                                    for s in seeds)
                row["best_epoch"] = [s["best"][arm]["epoch"] for s in seeds]
            table["arms"][key] = row
    untrained = seeds[0]["teacher_forced"][0]
    table["untrained"] = {"exact_acceptance_answers": untrained["exact"]["expected_acceptance"],
                          "greedy_agreement_continuations":
                          untrained["exact_continuations"]["greedy_agreement"],
                          "mean_accepted_length": _mean(s["decoding"][0]["speculative"]
                                                        ["mean_accepted_length"] for s in seeds)}
    for versus in ("distillspec", "kd_control"):
        for arm in ("adaspec_official", "adaspec_equal"):
            table["differences"][f"{arm} - {versus}"] = _differences(seeds, arm, versus, tf, dec)
            table.setdefault("per_seed", {})[f"{arm} - {versus}"] = [  # the headline measure
                _mean(tf(s, arm, "best", "exact_continuations")["per_token"]["greedy_agreement"])
                - _mean(tf(s, versus, "best", "exact_continuations")["per_token"]
                        ["greedy_agreement"]) for s in seeds]
    return table


def _differences(seeds, arm, versus, tf, dec) -> dict:
    out = {}
    for col, name in (("model", "E-epoch"), ("best", "best-epoch")):
        for source, measure, label in (
                ("exact", "expected_acceptance", "exact_acceptance_answers"),
                ("exact_continuations", "greedy_agreement", "greedy_agreement_continuations"),
                ("exact_continuations", "expected_acceptance", "exact_acceptance_continuations")):
            a = [tf(s, arm, col, source)["per_token"][measure] for s in seeds]
            b = [tf(s, versus, col, source)["per_token"][measure] for s in seeds]
            groups = tf(seeds[0], arm, col, source)["per_token"]["sequence_lengths"]
            out[f"{name}/{label}"] = clustered_difference(a, b, groups)
    out["best-epoch/mean_accepted_length"] = prompt_difference(
        [dec(s, arm)["per_prompt"] for s in seeds], [dec(s, versus)["per_prompt"] for s in seeds])
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# The report


def wall_minutes(work: Path) -> float | None:
    """Wall time of a task's study from its work folder's file times: the first cache file to
    the last seed's evaluation (includes pauses and whatever else shared the machine)."""
    files = [f for f in work.rglob("*") if f.is_file()]
    evals = [f.stat().st_mtime for f in work.glob("seed-*/eval.json")]
    if not files or not evals:
        return None
    return (max(evals) - min(f.stat().st_mtime for f in files)) / 60


def markdown(payload: dict) -> str:
    args = payload["settings"]
    lines = [
        "# AdaSPEC vs plain KD from the cache: the paper's protocol on the embedded pair",
        "",
        f"Target {args['target']} (chat template: {not args['raw_prompts']}), draft "
        f"{args['draft']}; per task {args['train_rows']} training, {args['val_rows']} "
        f"validation and {args['test_rows']} test rows carved from ../shared/data; E = "
        f"{args['epochs']} epochs, k = {args['k']}, lr {args['lr']}, batch {args['batch_size']}, "
        f"seeds {args['seeds']}; greedy speculative decoding with gamma {args['gamma']} on "
        f"{args['prompts']} test prompts, {args['max_new_tokens']} new tokens. Teacher-forced "
        "numbers use the full vocabulary with the target loaded: on the dataset's answers, and on "
        "the target's own greedy continuations of the test prompts (what speculative decoding "
        "sees). `best-epoch` models were chosen on the validation split, offline, from the cache.",
        "",
        f"This is the small regime ({args['train_rows']} training rows, drafts still improving "
        f"at their last epoch). {converged_verdict()}",
        "",
    ]
    for task, t in payload["tasks"].items():
        lines += _task_lines(task, t)
    timed = {task: t["wall_minutes"] for task, t in payload["tasks"].items()
             if t.get("wall_minutes") is not None}
    if timed:
        lines += ["## Run time", "", "Wall time per task, from the work folder's file times "
                  "(caches, target quality, every seed's runs and evaluations; on "
                  f"{payload['machine'].get('cores', '?')} CPU cores, shared with other jobs "
                  "where noted in the closing notes): " + ", ".join(
                      f"{task} {m:.0f} min" for task, m in timed.items()) + ".", ""]
    lines += ["## Verdict", "", payload.get("verdict", "(see the differences above)"), ""]
    return "\n".join(lines)


def _task_lines(task: str, t: dict) -> list[str]:
    lines = [f"## {task}", ""]
    q = t.get("quality", {})
    if q:
        lines += ["Target task quality on test prompts (greedy):", "",
                  "| prompts | " + q[next(iter(q))]["metric"] + " | mean output tokens |",
                  "|---|---|---|"]
        lines += [f"| {name} | {v['quality']:.3f} | {v['mean_output_tokens']:.1f} |"
                  for name, v in q.items()]
        lines.append("")
    s = t["summary"]
    lines += ["| arm | column | exact acc. (answers) | exact acc. (target cont.) | "
              "greedy agr. (target cont.) | alpha (real) | mean accepted length (real) |",
              "|---|---|---|---|---|---|---|"]
    u = s["untrained"]
    lines.append(f"| untrained draft | - | {u['exact_acceptance_answers']:.4f} | - | "
                 f"{u['greedy_agreement_continuations']:.4f} | - | "
                 f"{u['mean_accepted_length']:.3f} |")
    for key, row in s["arms"].items():
        arm, col = key.split("/")
        lines.append(
            f"| {ARM_NAMES[arm]} | {col} | {row['exact_acceptance_answers']:.4f} | "
            f"{row['exact_acceptance_continuations']:.4f} | "
            f"{row['greedy_agreement_continuations']:.4f} | "
            f"{_cell(row.get('alpha_paper'), 4)} | {_cell(row.get('mean_accepted_length'), 3)} |")
    paper = PAPER.get(task)
    if paper:
        shown = "; ".join(f"{col}: DistillSpec {d:.2f}, AdaSPEC {a:.2f} ({a - d:+.2f} pt)"
                          for col, (d, a) in paper.items())
        lines += ["", f"The paper (Pythia-31M -> 1.4B, alpha in %): {shown}."]
    lines += ["", "Differences in points (x100), mean ± standard error:", "",
              "| comparison | measure | difference |", "|---|---|---|"]
    for name, diffs in s["differences"].items():
        for measure, (mean, se) in diffs.items():
            scale = 1 if "length" in measure else 100
            lines.append(f"| {name} | {measure} | {mean * scale:+.2f} ± {se * scale:.2f} |")
    lines.append("")
    return lines


def _cell(value: float | None, digits: int) -> str:
    """A table cell: "-" where an arm has no such measurement (decoding runs best/ only)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def converged_verdict(path: Path | None = None) -> str:
    """The decisive study's verdict sentence, from its committed results."""
    path = path or harness.results_dir("studies") / "converged_study.json"

    if not path.is_file():
        return "The decisive study (docs/converged_study.md) has not run yet."
    payload = json.loads(path.read_text())
    a = payload["settings"]
    steps = [s["runs"]["R"]["schedule"]["optimizer_steps"] for s in payload["seeds"]
             if "R" in s["runs"]][:1]
    return (f"The decisive comparison, on the official schedule with a compute-matched control, "
            f"a target fine-tuned on the task, {a['train_rows']} {a['task']} training rows, "
            f"E = {a['epochs']:g} epochs ({steps[0] if steps else '?'} optimizer steps per arm) "
            f"and {len(a['seeds'].split(','))} seeds"
            f"{'' if payload['summary']['decision'].get('complete') else ' planned'}, is "
            "[converged_study.md]"
            "(converged_study.md): "
            f"{verdict_sentence(payload['summary'], 'greedy_agreement')}")


def verdict(tasks: dict) -> str:
    """One line per task: does AdaSPEC (official, best epoch) beat both, on continuations?"""
    out = []
    for task, t in tasks.items():
        d = t["summary"]["differences"]
        key = "best-epoch/greedy_agreement_continuations"
        base = d["adaspec_official - distillspec"][key]
        ctrl = d["adaspec_official - kd_control"][key]
        beats = base[0] - 2 * base[1] > 0 and ctrl[0] - 2 * ctrl[1] > 0
        per_seed = t["summary"].get("per_seed", {})
        by_seed = {name: " (seeds: " + ", ".join(f"{v * 100:+.2f}" for v in values) + ")"
                   for name, values in per_seed.items()}
        out.append(f"- {task}: AdaSPEC (official, best epoch) minus DistillSpec "
                   f"{base[0] * 100:+.2f} ± {base[1] * 100:.2f} pt"
                   f"{by_seed.get('adaspec_official - distillspec', '')}, minus the "
                   f"compute-matched control {ctrl[0] * 100:+.2f} ± {ctrl[1] * 100:.2f} pt"
                   f"{by_seed.get('adaspec_official - kd_control', '')} in greedy agreement on "
                   f"the target's continuations: {'beats both' if beats else 'does not beat both'}"
                   " (2 SE).")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("paper_table", __doc__, data=False, progress=True,
                       package="studies")
    p.add_argument("--tasks", default="gsm8k,alpaca,xsum")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-rows", type=int, default=48)
    p.add_argument("--val-rows", type=int, default=16)
    p.add_argument("--test-rows", type=int, default=16)
    p.add_argument("--prompts", type=int, default=16, help="test prompts decoded speculatively")
    p.add_argument("--epochs", type=float, default=2.0, help="E: the baseline's epochs")
    p.add_argument("--k", type=float, default=0.4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--quality-prompts", type=int, default=8)
    p.add_argument("--quality-tokens", type=int, default=128)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="smollm2-135m@layers=2")
    p.add_argument("--raw-prompts", action="store_true", help="no chat template")
    p.add_argument("--work", default="/tmp/adaspec-paper-table")
    p.add_argument("--doc", default=str(harness.REPO / "docs" / "paper_table.md"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        payload = json.loads(Path(args.out).read_text())
        for task, t in payload["tasks"].items():  # summaries as this version makes them
            work = Path(args.work) / task
            seeds = [work / f"seed-{s}" / "eval.json" for s in payload["settings"]["seeds"]
                     .split(",")]
            if all(f.is_file() for f in seeds):
                t["summary"] = summarize_task([json.loads(f.read_text()) for f in seeds])
                t["wall_minutes"] = wall_minutes(work)
    else:
        machine = harness.start(args)
        payload = {"benchmark": "paper_table", "machine": machine, "settings": vars(args),
                   "tasks": {}}
        for task in args.tasks.split(","):
            work = Path(args.work) / task
            cfg = base_config(args, task, work)
            ensure_caches(args, cfg, work)
            target_said = target_quality(args, cfg, work)
            seeds = [run_seed(args, cfg, work, int(s)) for s in args.seeds.split(",")]
            rows = CacheReader(cfg.cache.cache, task, "train").n_label_rows
            payload["tasks"][task] = {"quality": target_said, "train_label_tokens": rows,
                                      "summary": summarize_task(seeds),
                                      "wall_minutes": wall_minutes(work)}
            payload["verdict"] = verdict(payload["tasks"])
            harness.write_json(args.out, payload)  # after each task: a partial table
    payload["verdict"] = verdict(payload["tasks"])
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(markdown(payload))
    harness.write_json(args.out, payload)
    print(payload["verdict"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
