"""Validation acceptance while a draft trains, from a cached split, without the target.

The paper picks each draft's epoch by its acceptance on a validation set. With the target's rows
of a validation split in the cache, that costs one draft forward over the split: `Validator`
measures the offline expected acceptance (sum_x min(p, q), with the bounds the cached entries
leave) and the greedy agreement at each epoch end (and every `--eval-every` steps), logs them
as a `validation` line in metrics.jsonl, and with `--keep-best` keeps the best model in `best/`
(`best/best.json` says which step it is and what it scored), by `--best-metric`.

`--eval-cache` reads the split from another cache: one of the target's own greedy continuations
of the validation prompts, so that the model kept is the best at what speculative decoding sees.
`plateau` says whether a run had stopped improving on validation by its end.
"""

from __future__ import annotations

from pathlib import Path

from adaspec import models, provenance, runs, teacher_forced
from adaspec.config import Config
from cache_tools import schema
from cache_tools.store import CacheReader

BEST_METRICS = ("expected_acceptance", "greedy_agreement")
PLATEAU_TOLERANCE = 0.005  # 0.5 pt


class Validator:
    """Offline acceptance of the trained model on `cfg.train.eval_split` (main process)."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer):
        t = cfg.train
        root = t.eval_cache or cfg.cache.cache
        self.reader = CacheReader(root, cfg.data.task, t.eval_split, require=(schema.TARGET,),
                                  local_cache=provenance.local_cache_of(cfg, root))
        provenance.check_tokenizer(self.reader, tokenizer)
        if t.eval_cache is not None:
            provenance.check_same_target(cfg, self.reader, t.eval_cache)
        self.cfg, self.run_dir, self.tokenizer = cfg, run_dir, tokenizer
        self.keep_best, self.metric = t.keep_best, t.best_metric
        self.every = t.eval_every
        self.best = runs.read_best(run_dir)  # a resumed run keeps its best so far

    def due(self, step_done: int, epoch_ended: bool, last: bool) -> bool:
        return epoch_ended or last or bool(self.every and step_done % self.every == 0)

    def __call__(self, model, step_done: int, epoch: float) -> dict:
        """Measure `model` (switched to eval mode and back), log it, keep it if best."""
        was_training = model.training
        model.eval()
        try:
            result = teacher_forced.offline_acceptance(
                model, self.reader, self.reader.vocab_size, models.pad_id(self.tokenizer),
                self.cfg.cache.batch_tokens, progress=False)
        finally:
            model.train(was_training)
        lower, upper = result["expected_acceptance_lower"], result["expected_acceptance_upper"]
        validation = {"split": self.cfg.train.eval_split,
                      "expected_acceptance_lower": lower, "expected_acceptance_upper": upper,
                      "expected_acceptance": (lower + upper) / 2,
                      "greedy_agreement": result["greedy_agreement"],
                      "label_tokens": result["label_tokens"]}
        runs.log_metrics(self.run_dir, {"step": step_done, "epoch": epoch,
                                        "validation": validation})
        score = validation[self.metric]
        if self.keep_best and (self.best is None or score > self.best[self.metric]):
            self.best = {"step": step_done, "epoch": epoch, "metric": self.metric, **validation}
            models.save_model(model, self.tokenizer, runs.best_dir(self.run_dir))
            runs.write_best(self.run_dir, self.best)
        return validation


def validation_records(run_dir: Path) -> list[dict]:
    """The `validation` lines of a run's metrics, with their step and epoch."""
    return [{"step": r["step"], "epoch": r["epoch"], **r["validation"]}
            for r in runs.read_metrics(run_dir) if "validation" in r]


def plateau(records: list[dict], metric: str = "expected_acceptance",
            tolerance: float = PLATEAU_TOLERANCE) -> dict:
    """Whether a run had stopped improving: the mean `metric` of its evaluations in the last
    quarter of its steps beats the mean of those in the quarter before by less than `tolerance`
    (0.5 pt).

    Means, not maxima: one lucky evaluation neither makes a rising curve look flat nor a flat one
    rising, and a curve that keeps creeping up moves its mean. `records` are
    `validation_records` (step, metric). Returns {"reached", "change" (last-quarter mean minus
    the previous quarter's; None without evaluations in both), "since_step" (where the last
    quarter starts), "previous_from_step" (where the quarter before starts), "means" ([previous,
    last]), "evaluations" ([previous, last] counts), "metric", "tolerance", "rule"}.
    """
    out = {"metric": metric, "tolerance": tolerance, "reached": False, "change": None,
           "since_step": None, "previous_from_step": None, "means": None, "evaluations": None,
           "rule": "mean of the last quarter of steps minus mean of the quarter before"}
    if not records:
        return out
    last = max(r["step"] for r in records)
    since, previous_from = 0.75 * last, 0.5 * last
    previous = [r[metric] for r in records if previous_from < r["step"] <= since]
    window = [r[metric] for r in records if r["step"] > since]
    out.update(since_step=since, previous_from_step=previous_from,
               evaluations=[len(previous), len(window)])
    if previous and window:
        means = [sum(previous) / len(previous), sum(window) / len(window)]
        out.update(means=means, change=means[1] - means[0])
        out["reached"] = out["change"] < tolerance
    return out
