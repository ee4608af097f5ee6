"""The decisive study: AdaSPEC against plain KD on the official schedule, a fixed budget of
optimizer steps (900 in the committed study), on a target fine-tuned to the task.

Protocol (issue 17), on the embedded pair (SmolLM2-135M-Instruct with its chat template as the
target, its first 2 layers as the draft):

1. The paper's first step: the target fine-tuned on the training rows of seed 0's carve
   (`--stage sft`, lr 1e-5); its task quality before and after.
2. Per seed S (the seed varies the data carve, the cache's draws and the batch order): caches
   from the tuned target of S's training rows (default sampled cache), validation and test rows
   (top-64 float16), and of the target's own greedy continuations of the validation and test
   prompts (what speculative decoding sees).
3. Arms, all from the same draft initialisation (with a reduced head over the N ids of the
   training cache with the most target mass, `--draft-vocab`, as the drafts that speed up
   decoding here; 0 keeps the full vocabulary), each validated every `--eval-every` steps on
   the validation continuations and keeping its best model by greedy agreement there:
   - R: plain KD (k = 1) at batch b for E epochs: the reference and the DistillSpec baseline;
   - A: AdaSPEC k = 0.4 with R as reference on the official schedule (`--official-schedule`:
     E/k epochs at batch b/k, the same optimizer steps as R);
   - C: plain KD (k = 1) at batch b/k for E/k epochs: the same sequences and steps as A.
   For seed 0 also A and C with `--online` (dense target and reference): the sparse cache must
   not be what decides the sign. They run after every seed's R, A and C (the verdict first).
4. Endpoints on the test split's target continuations (teacher-forced, exact with the target):
   greedy agreement and expected acceptance; and real greedy speculative decoding (gamma 4)
   on the test prompts: mean accepted length. Per seed values, the seed-level mean with a
   t-interval, and the per-seed clustered standard errors beside it.

Decision rule, fixed before running: A beats C only if A - C > 0 in every seed and the seed-level
95% t-interval of A - C (greedy agreement on the test continuations) excludes 0, with C's
validation curve flat at its end (plateau: the mean of its last quarter of steps < 0.5 pt
above the mean of the quarter before, `validation.plateau`); C
beats A if A - C < 0 in every seed and the interval lies below 0 (a C still improving would only
widen that gap); otherwise no difference is shown.

    python -m studies.converged_study --progress                     # the study (hours, resumable)
    python -m studies.converged_study --train-rows 8 --val-rows 4 --test-rows 4 --prompts 2 \\
        --epochs 1 --batch-size 2 --k 0.5 --eval-every 2 --sft-epochs 0.5 --seeds 0 \\
        --dense-seed 0 --max-new-tokens 6 --target TINY --draft TINY@layers=1 --raw-prompts \\
        --work /tmp/cs --out /tmp/cs/s.json --doc /tmp/cs/s.md          # smoke (tiny model)

Work goes to --work; every step is skipped when its output exists and a killed run resumes
from its last checkpoint, so a re-run continues where the study stopped. A larger --epochs
extends finished runs (see `ensure_run`). Results are written after every arm: the results
JSON (--out) and the per-token values beside it (`tokens_path`) carry the study across
sessions whose work folder is gone (a new machine): every arm in them is reused
(`earlier_results`), R trained again only where an A arm needs it as reference (the same R,
by weight hash). `--report-only` re-makes the table and plots from the results JSON.

Seeds in parallel (one process per core, each seed with its own --out, the same --work; the
first alone until the tuned target is made, work/target/model), then their finished seeds
gathered into one results file:

    python -m studies.converged_study --seeds 1 --out parts/seed-1.json --doc parts/seed-1.md ...
    python -m studies.converged_study --merge parts/seed-*.json --out results.json ...
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
from pathlib import Path

import harness
from adaspec import models, quality, runs
from adaspec.build import build_stage
from adaspec.config import Config, build_config
from adaspec.evaluate import evaluate
from adaspec.experiment import (
    EVAL_CACHE,
    continuations_config,
    ensure_run,
    ensure_tuned_target,
    split_config,
)
from adaspec.experiment import ensure_reference as ensure_reference_run
from adaspec.statistics import clustered_difference, t_interval
from adaspec.validation import plateau, validation_records
from studies.decision_rule import decide, parts_sentence, power_sentence, verdict_sentence

ARMS = ("R", "A", "C")
DENSE = ("A-dense", "C-dense")
ARM_NAMES = {
    "R": "R: plain KD k=1, batch b, E epochs (reference, DistillSpec)",
    "A": "A: AdaSPEC k, batch b/k, E/k epochs (official schedule)",
    "C": "C: plain KD k=1, batch b/k, E/k epochs (control: A's sequences and steps)",
    "A-dense": "A with --online (dense target and reference)",
    "C-dense": "C with --online (dense target)",
}
HEADLINE = "greedy_agreement"  # on the test continuations: what greedy decoding accepts
ENDPOINTS = ("greedy_agreement", "expected_acceptance", "mean_accepted_length")


# ---------------------------------------------------------------------------------------------
# Configs


def base_config(args, seed: int, target: str, work: Path) -> Config:
    """The seed's settings: its carve (data seed), draws (cache seed) and batch order (seed)."""
    return build_config({
        "models": {"target": target, "draft": args.draft},
        "data": {"task": args.task, "data_files": harness.task_data(args.task),
                 "max_length": args.max_length,
                 "chat_template": not args.raw_prompts,
                 "limit": args.train_rows, "seed": seed},
        "cache": {"cache": str(work / "cache"), "seed": seed, "batch_tokens": 4096},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "weight_decay": 0.1,
                  "lr_schedule": "constant", "seed": seed, "eval_split": "validation",
                  "eval_cache": str(work / "continuations"), "eval_every": args.eval_every,
                  "keep_best": True, "best_metric": HEADLINE,
                  "checkpoint_every": args.eval_every * 2},
        "eval": {"gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
                 "prompts": args.prompts, "speed": False},
    })


def arm_config(args, cfg: Config, arm: str, run: Path, ref: Path | None) -> Config:
    """R, A, C (and the dense A, C) as train settings; see the module docstring."""
    k, b, e = args.k, args.batch_size, args.epochs
    base = arm.split("-")[0]
    t = {"R": {"stage": "ref", "k": 1.0, "batch_size": b, "epochs": e},
         "A": {"stage": "draft", "k": k, "batch_size": b, "epochs": e, "official_schedule": True},
         "C": {"stage": "draft", "k": 1.0, "batch_size": max(1, round(b / k)), "epochs": e / k},
         }[base]
    train_cfg = dataclasses.replace(cfg.train, out=str(run), online=arm.endswith("dense"),
                                    draft_vocab=args.draft_vocab or None, **t)
    models_cfg = cfg.models
    if base == "A" and train_cfg.online:
        models_cfg = dataclasses.replace(cfg.models, ref=str(runs.model_dir(ref)))
    return dataclasses.replace(cfg, train=train_cfg, models=models_cfg)


# ---------------------------------------------------------------------------------------------
# Steps (each skipped when its output exists)


def ensure_target(args, work: Path) -> str:
    """The target fine-tuned on seed 0's training rows (stage sft, online: no cache needed)."""
    cfg = base_config(args, 0, args.target, work / "sft")
    return ensure_tuned_target(cfg, work / "target", args.sft_lr, args.sft_epochs, args.progress)


def quality_path(args, work: Path) -> Path:
    """Where the target's quality is kept: named by what it measured (prompts, new tokens), so
    a study with other settings measures again instead of reading another's figures."""
    return work / f"quality-{args.quality_prompts}x{args.max_new_tokens}.json"


def target_quality(args, work: Path, tuned: str) -> dict:
    """Task quality of the target before and after fine-tuning (seed 0's test prompts)."""
    path = quality_path(args, work)
    if path.is_file():
        return json.loads(path.read_text())
    out = {}
    for name, spec in (("before fine-tuning", args.target), ("after fine-tuning", tuned)):
        model, tokenizer = models.load_model(spec)
        cfg = split_config(base_config(args, 0, spec, work), "test", args.test_rows)
        out[name] = quality.target_quality(cfg, model.eval(), tokenizer, args.quality_prompts,
                                           args.max_new_tokens, progress=args.progress)
        out[name]["target"] = spec
    part = path.with_name(path.name + ".part")  # (seeds run in parallel read it)
    part.write_text(json.dumps(out, indent=1))
    part.replace(path)
    return out


def ensure_caches(args, cfg: Config, folder: Path) -> None:
    p = args.progress
    build_stage(cfg, "target", progress=p)
    for split, rows in (("validation", args.val_rows), ("test", args.test_rows)):
        build_stage(split_config(cfg, split, rows, **EVAL_CACHE), "target", progress=p)
        build_stage(continuations_config(cfg, split, rows, str(folder / "continuations"),
                                         args.max_new_tokens), "target", progress=p)


def run_seed(args, work: Path, tuned: str, seed: int, arms: list[str], record: dict | None,
             save) -> dict:
    """Caches, then each of `arms` missing from the seed's `record` (None: nothing yet; the
    untrained draft is evaluated first) in turn: trained (R first where an A arm selects
    against it), evaluated on the test split and added to the record, which `save(record,
    tokens)` stores after every arm, so a session that ends mid-seed keeps its finished arms."""
    folder = work / f"seed-{seed}"
    todo = [arm for arm in arms if record is None or arm not in record["arms"]]
    if record is not None and not todo:
        return record
    cfg = base_config(args, seed, tuned, folder)
    ensure_caches(args, cfg, folder)
    test = split_config(cfg, "test", args.test_rows, **EVAL_CACHE)
    tokens = {} if record is None else {  # (a file's arms beyond the record: not this study's)
        arm: v for arm, v in read_tokens(tokens_path(args, seed)).items() if arm in record["arms"]}
    if record is None:
        record = {"seed": seed, "epochs": args.epochs, "arms": [], "drafts": [],
                  "teacher_forced": [], "decoding": [], "runs": {}, "differences": {}}
        add_draft(args, record, test, folder, args.draft)
        save(record, tokens)
    for arm in todo:
        check_partners(args, record, tokens, arm)
        ref = identity = None
        if arm == "R" or arm.startswith("A"):
            ref, identity = ensure_reference(args, cfg, folder, record,
                                             losses=not arm.endswith("dense"))
        if arm != "R":
            ensure_run(arm_config(args, cfg, arm, folder / arm, ref), args.progress,
                       identity if arm.startswith("A") else None)
        tokens[arm] = add_draft(args, record, test, folder, str(runs.best_dir(folder / arm)))
        record["arms"].append(arm)
        record["runs"][arm] = run_record(folder / arm)
        if identity is not None:  # R itself, or the R an A arm selected against
            record["runs"][arm]["reference_hash"] = identity["weight_hash"]
        record["differences"].update(differences(tokens, arm))
        save(record, tokens)
    return record


def check_partners(args, record: dict, tokens: dict, arm: str) -> None:
    """Refuse to train an arm whose comparison partner was evaluated but whose per-token values
    are missing (the file beside --out not committed or moved): the difference could never be
    computed, and the seed would silently drop out of it."""
    for a, b in COMPARISONS:
        partner = b if arm == a else a if arm == b else None
        if partner in record["arms"] and partner not in tokens:
            raise SystemExit(
                f"seed {record['seed']}: {partner}'s per-token values are not in "
                f"{tokens_path(args, record['seed'])}, so {a} - {b} cannot be computed; "
                "restore that file (it is committed beside the results)")


def ensure_reference(args, cfg: Config, folder: Path, record: dict, losses: bool = True
                     ) -> tuple[Path, dict]:
    """R trained (again, in a session whose work folder is gone: the training is
    deterministic, and its weight hash must be the one the seed's record holds, where it holds
    one) and, with `losses`, its per-token losses in the training cache (an --online arm
    computes them itself)."""
    recorded = record["runs"].get("R", {}).get("reference_hash")
    return ensure_reference_run(arm_config(args, cfg, "R", folder / "R", None), args.progress,
                                losses, recorded)


def add_draft(args, record: dict, test: Config, folder: Path, spec: str) -> dict:
    """Evaluate one draft on the test split (teacher-forced, exact, on the answers and on the
    target's continuations; real speculative decoding) and append it to the record; returns
    its per-token values on the continuations (kept apart from the record)."""
    [tf] = evaluate(test, [spec], ("exact",), progress=args.progress,
                    continuations_cache=str(folder / "continuations"), per_token=True)
    [decoding] = evaluate(test, [spec], ("speculative",), progress=args.progress)
    per_token = tf["exact_continuations"]["per_token"]
    for section in tf.values():
        if isinstance(section, dict):
            section.pop("per_token", None)
    record["drafts"].append(spec)
    record["teacher_forced"].append(tf)
    record["decoding"].append(decoding)
    return per_token


def tokens_path(args, seed: int) -> Path:
    """Where a seed's per-token values live: beside the results JSON (--out), committed with
    it, so a difference whose two arms ran in different sessions can still be computed."""
    out = Path(args.out)
    return out.parent / out.stem / f"seed-{seed}.tokens.json.gz"


def read_tokens(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as e:
        raise SystemExit(f"{path}: not readable per-token values ({e})") from None


def write_tokens(path: Path, tokens: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(gzip.compress(json.dumps(tokens).encode(), mtime=0))
    part.replace(path)


def run_record(run: Path) -> dict:
    """Schedule, validation curve, best step and plateau of one arm's run (of a run still
    going: so far, with the steps it has done)."""
    curve = validation_records(run)
    trained = runs.training_metrics(run)
    return {"schedule": runs.read_schedule(run), "validation": curve,
            "steps_done": trained[-1]["step"] if trained else 0,
            "best": runs.read_best(run),
            "plateau": plateau(curve, HEADLINE),
            "seconds": max((r.get("elapsed", 0.0) for r in runs.training_metrics(run)),
                           default=None)}


# ---------------------------------------------------------------------------------------------
# Statistics


def endpoints(seed: dict, index: int) -> dict:
    """Test endpoints of draft `index` of a seed (0: untrained, then the arms)."""
    tf = seed["teacher_forced"][index]["exact_continuations"]
    spec = seed["decoding"][index]["speculative"]
    return {"greedy_agreement": tf["greedy_agreement"],
            "expected_acceptance": tf["expected_acceptance"],
            "mean_accepted_length": spec["mean_accepted_length"],
            "exact_acceptance_answers": seed["teacher_forced"][index]["exact"][
                "expected_acceptance"]}


COMPARISONS = (("A", "C"), ("A", "R"), ("C", "R"), ("A-dense", "C-dense"))
MEASURES = ("greedy_agreement", "expected_acceptance")


def differences(tokens: dict, arm: str) -> dict:
    """a - b per measure on one seed's test continuations, with its standard error clustered
    by sequence (holds the two trained models fixed), for the comparisons that `arm` completes
    (`tokens`: per-token values by arm). Stored in the seed's record, so a seed restored
    without its per-token values still counts."""
    out = {}
    for a, b in COMPARISONS:
        if arm in (a, b) and a in tokens and b in tokens:
            ta, tb = tokens[a], tokens[b]
            out[f"{a} - {b}"] = {m: list(clustered_difference([ta[m]], [tb[m]],
                                                              ta["sequence_lengths"]))
                                 for m in MEASURES}
    return out


def summarize(records: list[dict]) -> dict:
    """Per-seed endpoints (every seed, finished or not), and over the seeds with every main
    arm (R, A, C): seed-level t-intervals of the differences and the decision rule."""
    per_arm: dict = {"untrained": [endpoints(s, 0) for s in records]}
    for arm in ARMS + DENSE:
        rows = [endpoints(s, 1 + s["arms"].index(arm)) for s in records if arm in s["arms"]]
        if rows:
            per_arm[arm] = rows
    seeds = [s for s in records if set(ARMS) <= set(s["arms"])]
    comparisons = {}
    for a, b in COMPARISONS:
        both = [s for s in seeds if f"{a} - {b}" in s["differences"]]
        if not both:
            continue
        row = {}
        for measure in MEASURES:
            diffs = [s["differences"][f"{a} - {b}"][measure] for s in both]
            values = [d for d, _ in diffs]
            row[measure] = {"per_seed": values, "per_seed_clustered_se": [se for _, se in diffs],
                            "pooled_clustered_se": math.sqrt(sum(se ** 2 for _, se in diffs))
                            / len(diffs), **t_interval(values)}
        values = [endpoints(s, 1 + s["arms"].index(a))["mean_accepted_length"]
                  - endpoints(s, 1 + s["arms"].index(b))["mean_accepted_length"] for s in both]
        row["mean_accepted_length"] = {"per_seed": values, **t_interval(values)}
        comparisons[f"{a} - {b}"] = row
    plateaus = {arm: [s["runs"][arm]["plateau"]["reached"] for s in seeds if arm in s["runs"]]
                for arm in ARMS + DENSE}
    return {"per_arm": per_arm, "comparisons": comparisons, "plateau": plateaus,
            "decision": decision(comparisons, plateaus)}


def decision(comparisons: dict, plateaus: dict) -> dict:
    """The rule stated before running (studies/decision_rule.py), on the headline measure."""
    return dataclasses.asdict(decide(comparisons.get("A - C", {}).get(HEADLINE),
                                     plateaus.get("C", [])))


# ---------------------------------------------------------------------------------------------
# Report: table, learning curves


def plot_curves(seeds: list[dict], path: Path) -> None:
    """Validation greedy agreement (target continuations) against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"R": "tab:blue", "A": "tab:red", "C": "tab:green", "A-dense": "tab:orange",
              "C-dense": "tab:olive"}
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, s in enumerate(seeds):
        for arm, run in s["runs"].items():
            curve = run["validation"]
            ax.plot([r["step"] for r in curve], [r[HEADLINE] for r in curve],
                    color=colors.get(arm, "k"), linestyle=styles[i % len(styles)],
                    label=f"{arm} seed {s['seed']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation greedy agreement (target continuations)")
    ax.set_title("Learning curves per arm and seed")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no curve yet: a seed with the untrained draft only
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cache_check_sentence(payload: dict) -> str | None:
    """The cache check in one sentence: on the seed with the --online pair, A - C from the
    sparse cache beside A-dense - C-dense (each ± its clustered SE), whether the sign holds,
    and how far each arm moved between cached and dense; None until both pairs are done."""
    for seed in payload["seeds"]:
        diffs = seed["differences"]
        if "A - C" in diffs and "A-dense - C-dense" in diffs:
            break
    else:
        return None
    (cached, cached_se), (dense, dense_se) = (diffs[k][HEADLINE]
                                              for k in ("A - C", "A-dense - C-dense"))

    def value(arm: str) -> float:
        return endpoints(seed, 1 + seed["arms"].index(arm))[HEADLINE]

    moved = ", ".join(f"{arm} {(value(arm + '-dense') - value(arm)) * 100:+.2f} pt"
                      for arm in ("A", "C"))
    same = "yes" if cached * dense > 0 else "no"
    return (f"The cache check (seed {seed['seed']}, --online: dense target and reference every "
            f"step): A-dense - C-dense {dense * 100:+.2f} ± {dense_se * 100:.2f} pt in greedy "
            f"agreement on the test continuations, against {cached * 100:+.2f} ± "
            f"{cached_se * 100:.2f} pt from the sparse cache on the same seed; same sign: "
            f"{same}. Dense minus cached, per arm: {moved}.")


def _steps(payload: dict) -> str:
    """The arms' optimizer steps, one number when they share it."""
    steps = sorted({run["schedule"]["optimizer_steps"] for seed in payload["seeds"]
                    for run in seed["runs"].values()})
    return " / ".join(str(n) for n in steps)


def markdown(payload: dict, plot_name: str) -> str:
    s = payload["summary"]
    lines = (_setup_lines(payload) + _quality_lines(payload.get("quality", {}))
             + _schedule_lines(payload) + _endpoint_lines(payload) + _difference_lines(s))
    lines += ["", "## Decision", "", verdict_sentence(s, HEADLINE), "",
              parts_sentence(s["decision"])]
    for name in ("A - C", "A - R"):  # in greedy agreement, the headline
        row = s["comparisons"].get(name, {}).get(HEADLINE)
        power = power_sentence(row, name) if row else None
        if power:
            lines += ["", power]
    check = cache_check_sentence(payload)
    if check:
        lines += ["", check]
    lines += ["", f"![learning curves]({plot_name})", ""]
    return "\n".join(lines)


def _setup_lines(payload: dict) -> list[str]:
    a = payload["settings"]
    head = f" with a {a['draft_vocab']}-id head (--draft-vocab)" if a["draft_vocab"] else ""
    lines = [
        "# AdaSPEC vs plain KD on the official schedule, a fixed budget of "
        f"{_steps(payload)} optimizer steps",
        "",
        f"Target {a['target']} fine-tuned on {a['train_rows']} {a['task']} training rows "
        f"(stage sft, lr {a['sft_lr']}, {a['sft_epochs']:g} epochs), "
        f"{'raw prompts' if a['raw_prompts'] else 'chat template'}; draft "
        f"{a['draft']}{head}. Per seed {a['train_rows']} training, {a['val_rows']} validation and "
        f"{a['test_rows']} test rows (the seed varies the carve, the cache's draws and the "
        f"batch order). b = {a['batch_size']}, E = {a['epochs']}, k = {a['k']}, lr {a['lr']} "
        f"constant; validation every {a['eval_every']} steps on the target's greedy "
        "continuations of the validation prompts, best model kept by greedy agreement there. "
        "Test endpoints: teacher-forced on the target's greedy continuations of the test "
        f"prompts (exact, target loaded), and real greedy speculative decoding (gamma "
        f"{a['gamma']}) of {a['prompts']} test prompts, {a['max_new_tokens']} new tokens.",
        "",
        "Decision rule (fixed before running): A beats C only if A - C > 0 in every seed and "
        "the seed-level 95% t-interval of A - C in greedy agreement on the test continuations "
        "excludes 0, with C's validation curve flat at its end (the mean of the last quarter "
        "of its steps < 0.5 pt above the mean of the quarter before); C beats A if A - C < 0 "
        "in every seed and the interval lies "
        "below 0 (a C still improving would only widen that gap); otherwise no difference is "
        "shown.",
        "",
    ]
    return lines


def _quality_lines(q: dict) -> list[str]:
    lines = []
    if q:
        lines += ["## The target, before and after fine-tuning", "",
                  "| target | task quality | mean output tokens |", "|---|---|---|"]
        lines += [f"| {name} | {v['quality']:.3f} | {v['mean_output_tokens']:.1f} |"
                  for name, v in q.items()]
        lines.append("")
    return lines


def _schedule_lines(payload: dict) -> list[str]:
    lines = ["## Schedules", "", "| arm | seed | epochs | batch | optimizer steps | best step | "
              "plateau (last-quarter mean minus the quarter before) |",
              "|---|---|---|---|---|---|---|"]
    for seed in payload["seeds"]:
        for arm, run in seed["runs"].items():
            sch, p = run["schedule"], run["plateau"]
            gain = "-" if p["change"] is None else f"{p['change'] * 100:+.2f} pt"
            lines.append(f"| {arm} | {seed['seed']} | {sch['epochs']:g} | {sch['batch_size']} | "
                         f"{sch['optimizer_steps']} | {run['best']['step']} | "
                         f"{'yes' if p['reached'] else 'no'} ({gain}) |")
    return lines


def _endpoint_lines(payload: dict) -> list[str]:
    lines = ["", "## Test endpoints per seed", "",
              "| arm | seed | greedy agreement (cont.) | expected acceptance (cont.) | "
              "mean accepted length (real, g=4) | exact acceptance (answers) |",
              "|---|---|---|---|---|---|"]
    measures = ("greedy_agreement", "expected_acceptance", "mean_accepted_length",
                "exact_acceptance_answers")
    for arm, rows in payload["summary"]["per_arm"].items():
        seeds = [x["seed"] for x in payload["seeds"] if arm == "untrained" or arm in x["arms"]]
        labelled = list(zip(map(str, seeds), rows, strict=True))
        if len(rows) >= 2:  # and the seed mean
            labelled.append(("mean", {m: sum(r[m] for r in rows) / len(rows) for m in measures}))
        for seed, r in labelled:
            lines.append(f"| {ARM_NAMES.get(arm, arm)} | {seed} | {r['greedy_agreement']:.4f} | "
                         f"{r['expected_acceptance']:.4f} | {r['mean_accepted_length']:.3f} | "
                         f"{r['exact_acceptance_answers']:.4f} |")
    return lines


def _difference_lines(s: dict) -> list[str]:
    lines = ["", "## Differences", "",
              "Points (x100) for agreement and acceptance, tokens for accepted length. Per seed "
              "± the clustered standard error (holds the trained models fixed); seed-level mean "
              "with its 95% t-interval (the spread of training).", "",
              "| comparison | measure | per seed | seed mean [95% t-interval] | pooled clustered "
              "SE |", "|---|---|---|---|---|"]
    for name, row in s["comparisons"].items():
        for measure, v in row.items():
            scale = 1 if measure == "mean_accepted_length" else 100
            ses = v.get("per_seed_clustered_se", [None] * len(v["per_seed"]))
            per_seed = ", ".join(f"{x * scale:+.2f}" + (f" ± {e * scale:.2f}" if e else "")
                                 for x, e in zip(v["per_seed"], ses, strict=True))
            interval = (f"{v['mean'] * scale:+.2f} [{v['low'] * scale:+.2f}, "
                        f"{v['high'] * scale:+.2f}]" if v["n"] >= 2
                        else f"{v['mean'] * scale:+.2f}")
            pooled = v.get("pooled_clustered_se")
            lines.append(f"| {name} | {measure} | {per_seed} | {interval} | "
                         f"{'-' if pooled is None else f'{pooled * scale:.2f}'} |")
    return lines


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("converged_study", __doc__, data=False, progress=True,
                       package="studies")
    p.add_argument("--task", default="arith")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--dense-seed", type=int, default=0, help="seed of the --online pair (-1: none)")
    p.add_argument("--train-rows", type=int, default=400)
    p.add_argument("--val-rows", type=int, default=48)
    p.add_argument("--test-rows", type=int, default=64)
    p.add_argument("--prompts", type=int, default=24, help="test prompts decoded speculatively")
    p.add_argument("--epochs", type=float, default=9.0,
                   help="E: R's epochs (raising it extends finished runs; 3 did not plateau)")
    p.add_argument("--k", type=float, default=0.4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=4, help="b: R's batch")
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--draft-vocab", type=int, default=4096,
                   help="every arm's reduced head (0: the full vocabulary)")
    p.add_argument("--sft-epochs", type=float, default=1.0, help="target fine-tune (0: none)")
    p.add_argument("--sft-lr", type=float, default=1e-5)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--quality-prompts", type=int, default=16)
    p.add_argument("--raw-prompts", action="store_true", help="no chat template")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="smollm2-135m@layers=2")
    p.add_argument("--work", default=str(harness.REPO.parent / "converged-study"))
    p.add_argument("--doc", default=str(harness.REPO / "docs" / "converged_study.md"))
    p.add_argument("--report-only", action="store_true",
                   help="re-make JSON, table and plot from the seeds finished in --work")
    p.add_argument("--merge", nargs="+", metavar="RESULTS", default=[],
                   help="gather the seeds of these results files of the same protocol (seeds "
                        "run in parallel, each with its own --out) and their per-token values "
                        "into --out; trains and evaluates nothing")
    args = p.parse_args(argv)
    work = Path(args.work)
    machine = harness.start(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    earlier = earlier_results(args)
    records = {s["seed"]: s for s in earlier.get("seeds", [])}  # (--seeds' or not: all kept)
    payload = {"benchmark": "converged_study", "machine": machine, "settings": vars(args)}

    def write() -> None:  # the seeds' records, finished or not; the arms still training
        payload["in_progress"] = in_progress(work, args, records)
        report(args, payload, [records[s] for s in sorted(records)])

    if args.merge:
        payload.update(merge_results(args, records, earlier))
        write()
        return 0
    if args.report_only:
        kept = quality_path(args, work)
        payload["quality"] = json.loads(kept.read_text()) if kept.is_file() \
            else earlier.get("quality", {})
        payload["tuned_target"] = earlier.get("tuned_target")
        payload["machine"] = earlier.get("machine", machine)  # the one that ran the study
        write()
        return 0
    tuned = ensure_target(args, work)
    payload["tuned_target"] = models.model_identity(tuned)["weight_hash"]
    if records and earlier.get("tuned_target") != payload["tuned_target"]:
        raise SystemExit(f"{args.out}: its seeds were distilled from another tuned target "
                         f"(weight hash {str(earlier.get('tuned_target'))[:12]}, this one "
                         f"{payload['tuned_target'][:12]}); give another --out to start over")
    payload["quality"] = target_quality(args, work, tuned) if args.sft_epochs else {}

    def save(record: dict, tokens: dict) -> None:
        write_tokens(tokens_path(args, record["seed"]), tokens)
        records[record["seed"]] = record
        write()

    write()  # the tuned target's quality, before a seed
    for seed in seeds:  # every seed's R, A and C: the verdict first
        run_seed(args, work, tuned, seed, list(ARMS), records.get(seed), save)
    if args.dense_seed in seeds:  # then the --online pair of one seed
        run_seed(args, work, tuned, args.dense_seed, list(ARMS + DENSE),
                 records.get(args.dense_seed), save)
    return 0


# Settings that do not change what a seed measures: a seed finished under other values of these
# is reused from the results JSON.
NOT_PROTOCOL = ("out", "threads", "progress", "seeds", "dense_seed", "work", "doc", "report_only",
                "merge")


def earlier_results(args) -> dict:
    """The results JSON (--out) an earlier session wrote, when it was made by this study under
    the same protocol: its seeds' arms are reused even where the work folder is gone (a new
    machine), so the study runs across sessions. One with seeds of other settings is refused
    (a study writes only its own results)."""
    path = Path(args.out)
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable results file ({e}); give another --out") \
            from None
    if not isinstance(earlier, dict) or earlier.get("benchmark") != "converged_study":
        raise SystemExit(f"{path}: not this study's results file; give another --out")
    ours = {k: v for k, v in vars(args).items() if k not in NOT_PROTOCOL}
    theirs = {k: v for k, v in earlier.get("settings", {}).items() if k not in NOT_PROTOCOL}
    if ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if earlier.get("seeds"):  # never overwritten by a study it does not belong to
            raise SystemExit(f"{path}: holds seeds run with other settings ({', '.join(changed)})"
                             "; give another --out to run these")
        return {}
    for seed in earlier.get("seeds", []):
        if "differences" not in seed:
            raise SystemExit(f"{path}: seed {seed.get('seed')} has no stored differences "
                             "(written before they were); give another --out")
    return earlier


def merge_results(args, records: dict, earlier: dict) -> dict:
    """The finished seeds (R, A and C evaluated) of the results files `args.merge` (this
    protocol's, each checked as `earlier_results` checks --out) added to `records` (--out's
    own), their per-token values copied beside --out; returns what the files must agree on
    (the tuned target, its quality, the machine). An unfinished seed, a seed held twice with
    other values (or other per-token values), a missing file or per-token file, or another
    tuned target is refused before anything is written."""
    source = {n: str(args.out) for n in records}
    shared, first = {}, {}
    if earlier.get("seeds"):
        shared = {k: earlier.get(k) for k in ("tuned_target", "quality", "machine")}
        first = dict.fromkeys(shared, str(args.out))
    tokens = {}
    for path in args.merge:
        part_args = argparse.Namespace(**{**vars(args), "out": path})
        part = earlier_results(part_args)
        if not part.get("seeds"):
            raise SystemExit(f"{path}: no results of this study with a finished seed to merge")
        for key in ("tuned_target", "quality"):
            first.setdefault(key, path)
            if shared.setdefault(key, part.get(key)) != part.get(key):
                raise SystemExit(f"{path}: another {key.replace('_', ' ')} than {first[key]}'s; "
                                 "its seeds are not comparable")
        shared.setdefault("machine", part.get("machine"))
        for seed in part["seeds"]:
            n = seed["seed"]
            if not set(ARMS) <= set(seed["arms"]):
                raise SystemExit(f"{path}: seed {n} is not finished (arms "
                                 f"{', '.join(seed['arms']) or 'none'}); merge finished seeds")
            if n in records and records[n] != seed:
                raise SystemExit(f"{path}: seed {n} is also in {source[n]}, with other values")
            values = read_tokens(tokens_path(part_args, n))
            if set(values) != set(seed["arms"]):
                raise SystemExit(f"{tokens_path(part_args, n)}: no per-token values for every "
                                 f"arm of seed {n}")
            held = tokens.get(n) or (read_tokens(tokens_path(args, n)) if n in records else {})
            if held and held != values:
                raise SystemExit(f"{path}: seed {n}'s per-token values differ from those of "
                                 f"{source[n]}")
            records[n], tokens[n], source[n] = seed, values, path
    for n, values in tokens.items():
        write_tokens(tokens_path(args, n), values)
    return shared


def in_progress(work: Path, args, records: dict) -> dict:
    """The arms trained or training in --work that no seed's record holds yet: schedule,
    steps done, validation curve and plateau so far (what a study that runs across sessions
    has to show between them)."""
    out = {}
    for seed in (int(x) for x in args.seeds.split(",")):
        folder = work / f"seed-{seed}"
        done = records[seed]["arms"] if seed in records else []
        arms = {arm: run_record(folder / arm) for arm in (*ARMS, *DENSE)
                if arm not in done and (folder / arm / runs.CONFIG_FILE).is_file()}
        if arms:
            out[str(seed)] = arms
    return out


def report(args, payload: dict, seeds: list[dict]) -> None:
    """JSON after every arm (before any: the target's quality and "no result yet"), and the
    table and plot once a seed has one."""
    for seed in seeds:  # plateau by the current rule, from each run's stored curve
        for run in seed["runs"].values():
            run["plateau"] = plateau(run["validation"], HEADLINE)
    payload["summary"] = summarize(seeds) if seeds else {"decision": decision({}, {})}
    payload["seeds"] = seeds
    if not seeds:
        harness.write_json(args.out, payload)
        print("no seed evaluated yet")
        return
    doc = Path(args.doc)
    plot = doc.with_suffix(".png")
    plot_curves(seeds, plot)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown(payload, plot.name))
    harness.write_json(args.out, payload)
    d = payload["summary"]["decision"]
    print(f"decision after {d['seeds']} seed(s): {d['outcome']}")


if __name__ == "__main__":
    raise SystemExit(main())
