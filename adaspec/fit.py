"""The training loop: `fit` trains one learner or several on the same micro-batches (`train`,
and the single-pass sweep with one learner per variant), with what it does between steps: log
lines (`log_step`), the divergence stop (`diverged`, `check_weights`), and a run's validation
and checkpoints (`EpochHooks`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaspec import models, runs
from adaspec.config import Config
from adaspec.errors import UserError
from adaspec.step import Learner
from adaspec.stream import BatchStream
from adaspec.validation import Validator


@dataclass
class LearnerRun:
    """A learner with its run folder, its length and its logging state."""

    learner: Learner
    run_dir: Path
    total_micro: int
    """Micro-batches it trains on (per process)."""
    grad_accum: int
    log_every: int
    max_grad_norm: float
    steps_logged: int = 0
    """Optimizer steps since the last log line."""
    last_log: float = 0.0
    elapsed_before: float = 0.0

    @property
    def total_steps(self) -> int:
        return -(-self.total_micro // self.grad_accum)

    def group_size(self, step_index: int) -> int:
        return min(self.grad_accum, self.total_micro - step_index * self.grad_accum)


def label_norm(accelerator, group) -> float | torch.Tensor:
    """Official normaliser: label tokens of the whole accumulated batch over all processes,
    divided by the process count since DDP averages the gradients of the processes. One process
    knows it on the host; several all-reduce it on the device (no host sync)."""
    count = sum(b.n_labels for b in group)
    # torch.full launches a fill on the device; a tensor copied from the host would wait for it.
    total = torch.full((), float(count), dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes == 1:
        return total
    return accelerator.reduce(total, "sum") / accelerator.num_processes


NONFINITE_LIMIT = 0.5
"""Fraction of a logging interval's label tokens whose loss may be non-finite before the run is
stopped as diverged (a few such tokens are skipped, as the official loss does)."""


def diverged(step: int, lr: float, max_grad_norm: float, why: str) -> UserError:
    clip = (f"--max-grad-norm is {max_grad_norm}" if max_grad_norm > 0
            else "gradient clipping is off (--max-grad-norm 0)")
    return UserError(f"training diverged at step {step}: {why}; lower --lr (now {lr:g}) or clip "
                     f"gradients ({clip}); the last checkpoint before it is kept, nothing "
                     "non-finite was saved")


def check_weights(accelerator, run: LearnerRun, step: int) -> None:
    """Stop a run whose weights turned non-finite before they are checkpointed or saved."""
    model = accelerator.unwrap_model(run.learner.loss_model).model
    bad = models.nonfinite_parameter(model)
    if bad is not None:
        lr = run.learner.scheduler.get_last_lr()[0]
        raise diverged(step, lr, run.max_grad_norm, f"parameter {bad} holds nan/inf")


def log_step(accelerator, run: LearnerRun, step_index: int, per_epoch: int, lr: float,
             started: float) -> dict:
    """Sync the learner's metrics once and append a line to its metrics.jsonl (main process)."""
    m = run.learner.pop_metrics(accelerator)
    now = time.perf_counter()
    micro_done = min(run.total_micro, (step_index + 1) * run.grad_accum)
    record = {
        "step": step_index + 1,
        "epoch": micro_done / per_epoch,
        "loss": m["loss_sum"] / accelerator.num_processes / max(run.steps_logged, 1),
        "selected_fraction": m["kept"] / max(m["label_tokens"], 1),
        "nonfinite_tokens": m["nonfinite_tokens"],
        "lr": lr,
        "tokens_per_s": m["tokens"] / max(now - run.last_log, 1e-9),
        "elapsed": run.elapsed_before + now - started,
    }
    if torch.cuda.is_available():  # the allocator's own count: no device sync
        record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.steps_logged, run.last_log = 0, now
    if m["nonfinite_tokens"] > NONFINITE_LIMIT * max(m["label_tokens"], 1):
        raise diverged(record["step"], lr, run.max_grad_norm,
                       f"{m['nonfinite_tokens']} of {int(m['label_tokens'])} label tokens since "
                       "the last log line had a non-finite loss")
    if accelerator.is_main_process:
        runs.log_metrics(run.run_dir, record)
    if accelerator.log_with:
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"},
                        step=record["step"])
    return record


def fit(accelerator, learner_runs: list[LearnerRun], stream: BatchStream, teacher, start_step: int,
        stop_step: int, progress: bool = True, desc: str = "train",
        checkpoint: Callable[[LearnerRun, int, int], bool] | None = None) -> None:
    """Train every run on the same micro-batches from `start_step` to `stop_step` (exclusive).

    Each micro-batch is read once and taught once; every run that is still going takes it. A
    run stops after its own last micro-batch. `checkpoint(run, step, micro_done)` is called after
    each run's optimizer step (validation, saving) and says whether it saved a checkpoint; a
    checkpoint step also logs, so resumed and uninterrupted runs log the same lines.
    """
    device = accelerator.device
    per_epoch = stream.batches_per_epoch
    longest = max(r.total_micro for r in learner_runs)
    first_gs = start_step * learner_runs[0].grad_accum
    batches = stream.batches(start_batch=first_gs, stop_batch=longest)
    bar = tqdm(total=max(r.total_steps for r in learner_runs), initial=start_step, desc=desc,
               unit="step", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    started = time.perf_counter()
    for run in learner_runs:
        run.last_log = started
    try:
        for step_index in range(start_step, stop_step):
            active = [r for r in learner_runs if step_index < r.total_steps]
            group = [next(batches) for _ in range(max(r.group_size(step_index) for r in active))]
            norms = [label_norm(accelerator, group[:r.group_size(step_index)]) for r in active]
            for i, host_batch in enumerate(group):
                batch = host_batch.to(device, non_blocking=True)  # its cached rows stay on host
                lesson = teacher(batch, device)
                for run, norm in zip(active, norms, strict=True):
                    n = run.group_size(step_index)
                    if i < n:
                        run.learner.micro_step(accelerator, batch, lesson, norm, n, sync=i == n - 1)
            saved = False
            for run in active:
                lr = run.learner.scheduler.get_last_lr()[0]
                run.learner.optimizer_step(accelerator, run.max_grad_norm)
                run.steps_logged += 1
                micro_done = step_index * run.grad_accum + run.group_size(step_index)
                saved = checkpoint is not None and checkpoint(run, step_index + 1, micro_done)
                last = step_index + 1 == run.total_steps
                if saved or last or (step_index + 1) % run.log_every == 0:
                    record = log_step(accelerator, run, step_index, per_epoch, lr, started)
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
    finally:
        batches.close()
        bar.close()


def epoch_ended(run: LearnerRun, step_done: int, micro_done: int, per_epoch: int) -> bool:
    """Whether optimizer step `step_done` finished an epoch (its micro-batches crossed one)."""
    return micro_done // per_epoch > (micro_done - run.group_size(step_done - 1)) // per_epoch


class EpochHooks:
    """What a training run does after an optimizer step: validation (epoch ends, every
    --eval-every steps, the last step) and checkpoints (epoch ends, every --checkpoint-every
    steps). Called by `fit`; returns whether it saved a checkpoint."""

    def __init__(self, accelerator, cfg: Config, run: LearnerRun, per_epoch: int,
                 validator: Validator | None, progress: bool):
        self.accelerator, self.t, self.run = accelerator, cfg.train, run
        self.per_epoch, self.validator, self.progress = per_epoch, validator, progress
        self.started = time.perf_counter()

    def __call__(self, _run: LearnerRun, step_done: int, micro_done: int) -> bool:
        t, run = self.t, self.run
        ended = epoch_ended(run, step_done, micro_done, self.per_epoch)
        if t.eval_split is not None and (ended or step_done == run.total_steps or (
                t.eval_every and step_done % t.eval_every == 0)):
            self.validate(step_done, micro_done / self.per_epoch)
        if not ((t.checkpoint_every and step_done % t.checkpoint_every == 0) or ended):
            return False
        position = {"step": step_done, "micro_batches": micro_done,
                    "epoch": micro_done // self.per_epoch,
                    "batch_in_epoch": micro_done % self.per_epoch,
                    "elapsed": run.elapsed_before + time.perf_counter() - self.started}
        check_weights(self.accelerator, run, step_done)
        runs.save_checkpoint(self.accelerator, run.run_dir, step_done, position, run.learner)
        return True

    def validate(self, step_done: int, epoch: float) -> None:
        accelerator = self.accelerator
        if self.validator is not None:  # the main process measures; the others wait
            v = self.validator(accelerator.unwrap_model(self.run.learner.loss_model).model,
                               step_done, epoch)
            if accelerator.log_with:
                accelerator.log({f"validation/{k}": v[k] for k in (
                    "expected_acceptance", "expected_acceptance_lower",
                    "expected_acceptance_upper", "greedy_agreement")}, step=step_done)
            if self.progress:
                tqdm.write(f"step {step_done} (epoch {epoch:.2f}): {self.t.eval_split} "
                           f"acceptance {v['expected_acceptance']:.4f}, greedy agreement "
                           f"{v['greedy_agreement']:.4f}")
        accelerator.wait_for_everyone()
