"""Sweeps: many draft variants trained from one cache, evaluated offline, tabled and plotted.

Every variant (k, epochs, divergence, seed) trains from the cached target rows and reference
losses, so the target and the reference are never loaded; each is then evaluated offline on a
cache of the evaluation split. A variant whose folder holds `result.json` is finished: a re-run
skips it, so an interrupted sweep continues where it stopped.

`single_pass=True` trains the variants that share a data order (same seed and divergence) in
one pass over the data: each micro-batch is read and decoded once and every draft takes its
step on it. A variant with fewer epochs simply stops earlier. The drafts end exactly as they
would when trained one by one, since each sees the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from adaspec import experiment, fit, models, provenance, runs, teacher_forced, train
from adaspec.config import Config
from adaspec.errors import UserError
from adaspec.validation import Validator
from cache_tools.errors import CacheError
from cache_tools.store import CacheReader

RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.yaml"


@dataclass(frozen=True)
class Variant:
    """One point of the grid."""

    k: float
    epochs: float
    loss: str
    seed: int

    @property
    def name(self) -> str:
        return f"k{self.k:g}-e{self.epochs:g}-{self.loss}-s{self.seed}"


def grid(ks: Iterable[float], epochs: Iterable[float], divergences: Iterable[str],
         seeds: Iterable[int]) -> list[Variant]:
    return [Variant(k, e, d, s) for d in divergences for s in seeds for e in epochs for k in ks]


def variant_config(cfg: Config, variant: Variant, run_dir: Path) -> Config:
    """The draft-stage config of one variant, written into its own run folder."""
    select = cfg.sweep.select_split
    train_cfg = dataclasses.replace(
        cfg.train, stage="draft", k=variant.k, epochs=variant.epochs, loss=variant.loss,
        seed=variant.seed, out=str(run_dir),
        eval_split=select if select else cfg.train.eval_split,
        keep_best=bool(select) or cfg.train.keep_best,
    )
    return train.resolve_config(dataclasses.replace(cfg, train=train_cfg))


# ---------------------------------------------------------------------------------------------
# Training several variants in one pass


def train_single_pass(cfg: Config, variants: list[Variant], out: Path,
                      progress: bool = True) -> dict[str, float]:
    """Train `variants` (same seed and divergence) over one shared stream of batches.

    It is `fit.fit` with one learner per variant: every rule, threshold and accumulation that
    training supports works here. Returns the seconds each variant's run took (the shared pass's
    time split evenly: reading and teaching are shared).
    """
    if len({(v.seed, v.loss) for v in variants}) != 1:
        raise ValueError("a single pass needs one seed and one divergence")
    configs = [variant_config(cfg, v, out / v.name) for v in variants]
    base = configs[0]
    if any(c.train.needs_ref for c in configs):  # the stream reads the reference's losses
        base = next(c for c in configs if c.train.needs_ref)
    accelerator = train.accelerator_for(base)
    world = accelerator.num_processes
    torch.manual_seed(variants[0].seed)
    inputs = train.open_inputs(base, accelerator)  # as train.train: one setup for both
    per_epoch, tokenizer = inputs.per_epoch, inputs.tokenizer
    learner_runs, validators = [], {}
    owner = contextlib.ExitStack()
    for vcfg in configs:
        model = train.compiled(copy.deepcopy(inputs.model), vcfg.train)
        run = train.prepare_run(accelerator, vcfg, model, per_epoch, inputs.vocab_size)
        owner.enter_context(runs.owned(run.run_dir, hold=accelerator.is_main_process))
        if accelerator.is_main_process:
            runs.start_run_dir(run.run_dir, vcfg, 0,
                               train.schedule_of(vcfg.train, per_epoch, run.total_steps, world),
                               inputs.reference if vcfg.train.needs_ref else None)
        learner_runs.append(run)
        if vcfg.train.eval_split is not None and accelerator.is_main_process:
            validators[id(run)] = Validator(vcfg, run.run_dir, tokenizer)

    def validate(run: fit.LearnerRun, step_done: int, micro_done: int) -> bool:
        """Each variant measured on the selection split at its epoch ends and its last step."""
        validator = validators.get(id(run))
        ended = fit.epoch_ended(run, step_done, micro_done, per_epoch)
        if validator is not None and (ended or step_done == run.total_steps):
            validator(accelerator.unwrap_model(run.learner.loss_model).model, step_done,
                      micro_done / per_epoch)
        return False

    started = time.perf_counter()
    with owner:
        fit.fit(accelerator, learner_runs, inputs.stream, inputs.teacher, 0,
                max(r.total_steps for r in learner_runs), progress,
                f"single pass x{len(learner_runs)}", validate)
        seconds = (time.perf_counter() - started) / len(learner_runs)
        for vcfg, r in zip(configs, learner_runs, strict=True):
            if id(r) in validators:
                train.report_plateau(r.run_dir, r.total_steps, vcfg.train.best_metric, progress)
            fit.check_weights(accelerator, r, r.total_steps)
            if accelerator.is_main_process:
                models.save_model(accelerator.unwrap_model(r.learner.loss_model).model,
                                  tokenizer, runs.model_dir(r.run_dir))
    return {v.name: seconds for v in variants}


# ---------------------------------------------------------------------------------------------
# The sweep


def _final_loss(run_dir: Path) -> float | None:
    records = runs.training_metrics(run_dir)
    return records[-1]["loss"] if records else None


def evaluate_variant(cfg: Config, variant: Variant, run_dir: Path, eval_reader: CacheReader,
                     train_seconds: float | None, progress: bool) -> dict:
    def offline(folder: Path) -> dict:
        draft, tokenizer = models.load_model(str(folder))
        pad_id = models.pad_id(tokenizer)
        return teacher_forced.offline_acceptance(draft.eval(), eval_reader,
                                           models.real_vocab_size(tokenizer), pad_id,
                                           cfg.cache.batch_tokens, progress)

    final = offline(runs.model_dir(run_dir))
    lower, upper = final["expected_acceptance_lower"], final["expected_acceptance_upper"]
    result = {
        "name": variant.name, "k": variant.k, "epochs": variant.epochs, "loss": variant.loss,
        "seed": variant.seed, "alpha_lower": lower, "alpha_upper": upper,
        "alpha_mid": (lower + upper) / 2, "greedy_agreement": final["greedy_agreement"],
        "eval_tokens": final["label_tokens"], "final_train_loss": _final_loss(run_dir),
        "train_seconds": train_seconds,
    }
    best_record = runs.read_best(run_dir)
    if best_record is not None:  # the epoch the selection split chose, measured on the eval split
        best = offline(runs.best_dir(run_dir))
        result.update({
            "best_epoch": best_record["epoch"],
            "best_alpha_mid": (best["expected_acceptance_lower"]
                               + best["expected_acceptance_upper"]) / 2,
            "best_greedy_agreement": best["greedy_agreement"],
        })
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_sweep(cfg: Config, variants: list[Variant] | None = None, out: Path | str | None = None,
              eval_split: str | None = None, single_pass: bool | None = None,
              progress: bool = True) -> list[dict]:
    """Train and evaluate every unfinished variant; write the table and plots; return all rows.

    Defaults come from `cfg.sweep` (the grid, folder, evaluation split, single pass); the
    settings the sweep ran with are saved beside its results as `sweep.yaml`.
    """
    s = cfg.sweep
    variants = grid(s.k, s.epochs, s.loss, s.seeds) if variants is None else variants
    out = Path(s.out if out is None else out)
    eval_split = s.eval_split if eval_split is None else eval_split
    single_pass = s.single_pass if single_pass is None else single_pass
    if single_pass and cfg.train.official_schedule and len({v.k for v in variants}) > 1:
        raise UserError("--official-schedule gives each k its own batch size, so variants of "
                        "several k cannot share one pass; drop --single-pass")
    try:
        eval_reader = provenance.reader_of(cfg, split=eval_split)
    except CacheError as err:  # say how to make the evaluation cache
        raise UserError(
            f"{err}; the sweep evaluates offline on a cache of --eval-split {eval_split}: "
            f"`adaspec-cache build --model target --task {cfg.data.task} --split {eval_split} "
            "--sparse topk --topk 64 --value-encoding float16` (tight, exact offline bounds)"
        ) from None
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).is_file():
        raise UserError(f"--out {out} is not empty and not a sweep folder (no {SWEEP_FILE}); "
                        "choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    saved = cfg.to_dict()
    saved["sweep"] = {**saved["sweep"], "out": str(out), "eval_split": eval_split,
                      "single_pass": single_pass,
                      "variants": [v.name for v in variants]}
    (out / SWEEP_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    todo = [v for v in variants if not (out / v.name / RESULT_FILE).exists()]
    # A variant killed after training (during its evaluation) is only evaluated again; one
    # killed while training resumes from its checkpoint (or, in a single pass, starts over).
    untrained = [v for v in todo if not runs.is_finished(out / v.name)]
    seconds: dict[str, float | None] = {}
    if single_pass:
        groups: dict[tuple, list[Variant]] = {}
        for v in untrained:
            groups.setdefault((v.seed, v.loss), []).append(v)
        for group in groups.values():
            for v in group:
                if (out / v.name).exists():
                    runs.discard_run(out / v.name)
            seconds.update(train_single_pass(cfg, group, out, progress))
    else:
        for v in untrained:  # trained, or resumed from its last checkpoint
            started = time.perf_counter()
            experiment.ensure_run(variant_config(cfg, v, out / v.name), progress)
            seconds[v.name] = time.perf_counter() - started
    for v in todo:
        seconds.setdefault(v.name, None)  # trained before an interruption: not timed
    for v in todo:
        evaluate_variant(cfg, v, out / v.name, eval_reader, seconds[v.name], progress)
    rows = [json.loads((out / v.name / RESULT_FILE).read_text()) for v in variants]
    write_tables(rows, out)
    plot_results(rows, out)
    write_report(rows, out, cfg, eval_split)
    return rows


COLUMNS = ["name", "k", "epochs", "loss", "seed", "alpha_lower", "alpha_upper", "alpha_mid",
           "greedy_agreement", "best_epoch", "best_alpha_mid", "best_greedy_agreement",
           "final_train_loss", "train_seconds"]


def _table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The results table's header and cells (markdown and HTML share them)."""
    best = any("best_epoch" in r for r in rows)
    header = ["variant", "k", "epochs", "loss", "seed", "expected acceptance (offline bounds)",
              "greedy agreement"]
    if best:
        header += ["best epoch", "best-epoch acceptance", "best-epoch greedy"]
    header.append("final train loss")
    cells = []
    for r in rows:
        row = [r["name"], f"{r['k']:g}", f"{r['epochs']:g}", r["loss"], str(r["seed"]),
               f"{r['alpha_lower']:.4f} - {r['alpha_upper']:.4f}", f"{r['greedy_agreement']:.4f}"]
        if best:
            row += ([f"{r['best_epoch']:g}", f"{r['best_alpha_mid']:.4f}",
                     f"{r['best_greedy_agreement']:.4f}"] if "best_epoch" in r else ["-"] * 3)
        row.append("" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}")
        cells.append(row)
    return header, cells


def write_tables(rows: list[dict], out: Path) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header, cells = _table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write_report(rows: list[dict], out: Path, cfg: Config, eval_split: str) -> Path:
    """report.html: one self-contained page (the plots inlined) a person would rather read than
    the CSV: the results table, the plots, the cache's settings and links to every variant."""
    import base64
    import html

    header, cells = _table_rows(rows)

    def table(head: list[str], body: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                      for row in body)
        return f"<table><tr>{th}</tr>{trs}</table>"

    link_cells = "".join(
        f"<li><b>{html.escape(r['name'])}</b>: "
        + " · ".join(f'<a href="{html.escape(r["name"])}/{f}">{f}</a>'
                     for f in (runs.CONFIG_FILE, runs.METRICS_FILE, "result.json",
                               f"{runs.MODEL_DIR}/")
                     if (out / r["name"] / f.rstrip("/")).exists())
        + "</li>" for r in rows)
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{name}'
        f"</figcaption></figure>" for name in ("alpha_vs_k.png", "loss_curves.png")
        if (out / name).is_file())
    try:
        params = provenance.reader_of(cfg).target_params
    except CacheError:
        params = {}
    cache_rows = [[k, json.dumps(v) if isinstance(v, dict) else str(v)]
                  for k, v in params.items() if k != "model"]
    cache_rows.insert(0, ["target", str((params.get("model") or {}).get("spec"))])
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>adaspec sweep: {html.escape(cfg.data.task)}</title><style>
body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}} th{{background:#f3f3f3}}
td:first-child{{text-align:left}} img{{max-width:48em}}</style></head><body>
<h1>Sweep over {html.escape(cfg.data.task)}/{html.escape(cfg.data.split)}</h1>
<p>{len(rows)} variants trained from one cache ({html.escape(cfg.cache.cache)}), each measured
offline on the cached <b>{html.escape(eval_split)}</b> split: expected acceptance
sum<sub>x</sub> min(p, q) between the bounds the cached entries leave, and greedy agreement with
the target's top-1. Draft initialisation: {html.escape(cfg.models.draft)}.</p>
<h2>Results</h2>{table(header, cells)}
<h2>Plots</h2>{images}
<h2>The cache</h2>{table(["setting", "value"], cache_rows)}
<h2>Variants</h2><ul>{link_cells}</ul>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def plot_results(rows: list[dict], out: Path) -> None:
    """alpha_vs_k.png (one line per epochs/loss, bounds shaded) and loss_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["epochs"], r["loss"]), []).append(r)
    for (epochs, loss), points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["k"])
        ks = [p["k"] for p in points]
        line = ax.plot(ks, [p["alpha_mid"] for p in points], marker="o",
                       label=f"{epochs:g} epoch(s), {loss}")[0]
        ax.fill_between(ks, [p["alpha_lower"] for p in points],
                        [p["alpha_upper"] for p in points], color=line.get_color(), alpha=0.2)
        ax.plot(ks, [p["greedy_agreement"] for p in points], linestyle="--",
                color=line.get_color(), alpha=0.7)
    ax.set_xlabel("k (fraction of tokens kept)")
    ax.set_ylabel("acceptance (offline)")
    ax.set_title("expected acceptance (solid, bounds shaded); greedy agreement (dashed)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing plotted yet: no empty legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "alpha_vs_k.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        records = runs.training_metrics(out / r["name"])
        if records:
            ax.plot([m["step"] for m in records], [m["loss"] for m in records], label=r["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
