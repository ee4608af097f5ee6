"""One training step: what the teacher says about a micro-batch, and learners that take it.

A *teacher* is chosen once, before the loop: the cache (`CachedTeacher`: the target's sparse rows
and the reference's losses stored with the batch), live models (`OnlineTeacher`: the target and
reference run on the batch, dense losses) or the labels themselves (`LabelTeacher`, SFT). It turns
each micro-batch into a `Lesson`. A *learner* is one trained model with its optimiser, schedule
and token rule; `Learner.micro_step` runs forward, selects tokens (`selection.select`, one
function for every rule), reduces and backpropagates, and `Learner.optimizer_step` clips and
steps. `train.train` runs one learner; a single-pass sweep runs several on the same lessons.

No host sync happens per micro-batch: metrics accumulate in device tensors that the loop reads
once per logging interval (`Learner.pop_metrics`).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from adaspec import draft_vocab, labels, losses, models, selection, sparse
from adaspec.errors import UserError
from adaspec.sparse import SparseTarget

STAGES = ("draft", "ref", "sft")
SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
# accelerate's trackers (each needs its own package installed: tensorboard, wandb, ...)
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "clearml", "dvclive",
            "swanlab", "trackio", "all")
# The package each tracker needs (accelerate only warns and logs nothing without it).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml",
                    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive",
                    "swanlab": "swanlab", "trackio": "trackio"}


def check_tracker(name: str | None) -> None:
    """Refuse --report-to for a tracker whose package is not installed, in one line."""
    if name is None or name == "all":
        return
    import importlib.util

    package = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {name} needs the {package} package, which is not "
                        f"installed: pip install {package}")


GLOBAL_WINDOW = 50  # micro-batches of deltas behind the running "global" AdaSPEC threshold


# ---------------------------------------------------------------------------------------------
# Settings shared by every learner


def mixed_precision(name: str, dtype: str) -> str:
    """The autocast mode of a training run (accelerate's `mixed_precision`).

    The trained model's weights and AdamW's state are always float32: bf16/fp16 enter only
    through autocast, as in accelerate's and DeepSpeed's mixed precision. (AdamW on bf16 weights
    loses most small updates: at lr 1e-5 only ~11% of a tiny model's weights moved in 8 steps.)
    `auto` is bf16 on CUDA, and on CPU follows `--dtype`: bfloat16 or float16 -> bf16 autocast,
    else no autocast. `--dtype` itself only sets the frozen models (target, online reference).
    """
    cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if dtype in ("bfloat16", "float16") else "no"
    if name == "fp16" and not cuda:
        raise UserError("--mixed-precision fp16 needs a CUDA device; use bf16 or no on CPU")
    return name


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then 1 (constant) or a cosine decay reaching 0 after `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights) only; biases and norm gains are vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# The trained model and its per-token loss


class _TokenLoss:
    """The per-token loss of a draft whose logits come from its whole forward (a head that is not
    plain: `models.has_plain_head`), against sparse target rows or dense target logits.

    One object per `LossModel`, chosen once by `_token_loss` from the model's head; subclasses
    change only how the draft's label rows are made. The model is passed on each call (the
    `LossModel` owns it), and its head is read on each call.
    """

    def __init__(self, vocab_size: int, divergence: str, beta: float, chunk_tokens: int):
        self.vocab_size, self.divergence, self.beta = vocab_size, divergence, beta
        self.chunk_tokens = chunk_tokens

    def logits(self, model, batch: labels.LabelBatch) -> torch.Tensor:
        """(N, V) the draft's logits at the label rows."""
        out = model(**labels.forward_inputs(model, batch))
        return models.cut_logits(out.logits[batch.index_b, batch.index_t], self.vocab_size)

    def sparse(self, model, batch, target: SparseTarget, want_argmax: bool):
        logits = self.logits(model, batch)
        loss = losses.sparse_divergence(logits, target, self.divergence, self.beta)
        return loss, logits.detach().argmax(-1) if want_argmax else None

    def dense(self, model, batch, target_logits: torch.Tensor, want_argmax: bool):
        logits = self.logits(model, batch)
        loss = losses.dense_divergence(logits, target_logits, self.divergence, self.beta)
        return loss, logits.detach().argmax(-1) if want_argmax else None


class _PlainHeadLoss(_TokenLoss):
    """A plain head: applied to the label rows' hidden states only, and against sparse rows
    chunked (`losses.sparse_divergence_chunked`: one chunk's (chunk_tokens, V) logits at once)."""

    def logits(self, model, batch: labels.LabelBatch) -> torch.Tensor:
        head = model.get_output_embeddings()
        return models.cut_logits(head(labels.label_hidden(model, batch)), self.vocab_size)

    def sparse(self, model, batch, target: SparseTarget, want_argmax: bool):
        head = model.get_output_embeddings()
        hidden = labels.label_hidden(model, batch)  # (N, H)
        loss = losses.sparse_divergence_chunked(
            hidden, head.weight, target, self.divergence, self.beta, self.chunk_tokens,
            lm_head_bias=head.bias, vocab_size=self.vocab_size)
        if not want_argmax:
            return loss, None
        with torch.no_grad():
            argmax = torch.cat([
                models.cut_logits(head(part), self.vocab_size).argmax(-1)
                for part in hidden.split(self.chunk_tokens)
            ]) if len(hidden) else hidden.new_zeros(0, dtype=torch.long)
        return loss, argmax


class _ReducedHeadLoss(_TokenLoss):
    """A reduced head (`draft_vocab.ReducedHead`, --draft-vocab): the divergence over its mapped
    ids and rest outcome; the argmax is over the mapped ids, as the draft proposes."""

    def sparse(self, model, batch, target: SparseTarget, want_argmax: bool):
        reduced = draft_vocab.reduced_head_of(model)
        hidden = labels.label_hidden(model, batch)  # (N, H)
        loss = losses.sparse_divergence_chunked(
            hidden, reduced.weight, target, self.divergence, self.beta, self.chunk_tokens,
            to_draft=reduced.to_draft)
        if not want_argmax:
            return loss, None
        with torch.no_grad():
            argmax = reduced.ids[reduced.restricted_logits(hidden)[:, :-1].argmax(-1)] \
                if len(hidden) else hidden.new_zeros(0, dtype=torch.long)
        return loss, argmax

    def dense(self, model, batch, target_logits: torch.Tensor, want_argmax: bool):
        reduced = draft_vocab.reduced_head_of(model)
        logits = reduced.restricted_logits(labels.label_hidden(model, batch))  # (N, n + 1)
        loss = losses.dense_restricted_divergence(logits, target_logits, reduced.ids,
                                                  self.divergence, self.beta)
        argmax = reduced.ids[logits[:, :-1].argmax(-1)].detach() if want_argmax else None
        return loss, argmax


def _token_loss(model, vocab_size: int, divergence: str, beta: float,
                chunk_tokens: int) -> _TokenLoss:
    """The per-token loss for `model`'s head: reduced, plain, or neither (the whole forward)."""
    if draft_vocab.reduced_head_of(model) is not None:
        kind = _ReducedHeadLoss
    elif models.has_plain_head(model):
        kind = _PlainHeadLoss
    else:
        kind = _TokenLoss
    return kind(vocab_size, divergence, beta, chunk_tokens)


class LossModel(torch.nn.Module):
    """The trained causal LM plus its per-token loss at the label positions.

    The loss lives in `forward` so that under DDP every parameter use (the lm_head used by the
    chunked loss included) happens inside the wrapped module's forward. Which loss (how the
    draft's label rows are made, from its head) is chosen once, here (`_token_loss`).
    """

    def __init__(self, model, vocab_size: int, divergence: str, beta: float, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.divergence = divergence
        self.beta = beta
        self.chunk_tokens = chunk_tokens
        self.plain_head = models.has_plain_head(model)
        head = model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else vocab_size
        if isinstance(head, draft_vocab.ReducedHead):
            rows = head.vocab_rows
        if rows < vocab_size:
            raise UserError(
                f"the model's head has {rows} rows but the tokenizer has {vocab_size} ids; "
                "the model does not match the tokenizer"
            )
        self.token_loss = _token_loss(model, vocab_size, divergence, beta, chunk_tokens)

    def forward(
        self,
        batch: labels.LabelBatch,
        target: SparseTarget | None = None,
        target_logits: torch.Tensor | None = None,
        want_argmax: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token loss against `target` (sparse, chunked) or `target_logits` (dense).

        Args:
            batch: the micro-batch, on the model's device.
            target: the N label tokens' sparse target rows, or
            target_logits: (N, V) float target logits at the same positions (online mode).
            want_argmax: also return the model's argmax at the label positions.

        Returns:
            ((N,) float32 loss, (N,) int64 argmax or None).
        """
        if target_logits is not None:
            return self.token_loss.dense(self.model, batch, target_logits, want_argmax)
        return self.token_loss.sparse(self.model, batch, target, want_argmax)


# ---------------------------------------------------------------------------------------------
# Teachers


@dataclass
class Lesson:
    """What the teacher says about one micro-batch of N label tokens (on the device)."""

    target: SparseTarget | None = None
    """Sparse target rows (cached rows, or one-hot labels for SFT)."""
    target_logits: torch.Tensor | None = None
    """(N, V) float32 dense target logits (online)."""
    ref_loss: torch.Tensor | None = None
    """(N,) float32 the reference's per-token loss (AdaSPEC with k < 1)."""
    valid: torch.Tensor | None = None
    """(N,) bool rows whose target is usable (a cached row with NaN/+inf values is not)."""

    def target_top1(self) -> torch.Tensor:
        """(N,) int64 the target's most likely token."""
        if self.target_logits is not None:
            return self.target_logits.argmax(-1)
        return sparse.top1(self.target)


class CachedTeacher:
    """The cache: the target's sparse rows (and the reference's losses) read with the batch.

    Teachers take the micro-batch with its token tensors on the device; rows the stream read
    with it (`stream.Batch.target`, `.ref_loss`) are still on the host, in pinned memory.
    """

    def __call__(self, batch, device) -> Lesson:
        target = batch.target.to(device, non_blocking=True)
        # A cached row with NaN/+inf values (the build refuses them; an old or hand-made store
        # may hold some) is emptied: loss 0, no gradient, and counted as non-finite.
        valid = target.valid_rows()  # (N,) bool
        ref_loss = None if batch.ref_loss is None else batch.ref_loss.to(device, non_blocking=True)
        return Lesson(target=target.emptied(~valid), ref_loss=ref_loss, valid=valid)


class LabelTeacher:
    """The labels themselves (SFT): forward KL against a one-hot target is cross-entropy."""

    def __call__(self, batch, device) -> Lesson:
        return Lesson(target=sparse.one_hot(batch.label_ids.to(device)))


class OnlineTeacher:
    """Live frozen models: the target's dense logits and, for AdaSPEC, the reference's loss."""

    def __init__(self, target_model, ref_model, vocab_size: int, divergence: str, beta: float):
        self.target_model, self.ref_model = target_model, ref_model
        self.vocab_size, self.divergence, self.beta = vocab_size, divergence, beta

    @torch.no_grad()
    def __call__(self, batch, device) -> Lesson:
        target_logits = labels.LabelLogits(self.target_model, batch, self.vocab_size)()
        ref_loss = None
        if self.ref_model is not None:
            ref = labels.LabelLogits(self.ref_model, batch, self.vocab_size)
            reduced = ref.reduced_head
            ref_loss = losses.dense_divergence(ref(), target_logits, self.divergence, self.beta) \
                if reduced is None else losses.dense_restricted_divergence(
                    ref.restricted(), target_logits, reduced.ids, self.divergence, self.beta)
        return Lesson(target_logits=target_logits.to(device), ref_loss=ref_loss)


# ---------------------------------------------------------------------------------------------
# Learners


@dataclass
class Learner:
    """One trained model with its optimiser, schedule, token rule and metric totals.

    `loss_model` and `optimizer` are as `accelerator.prepare` returned them.
    """

    loss_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rule: str
    """`selection.RULES` entry, used when k < 1."""
    k: float
    threshold: str
    normalize: str
    window: deque = field(default_factory=lambda: deque(maxlen=GLOBAL_WINDOW))
    """Deltas of the last micro-batches, for threshold "global" (see `micro_step`)."""
    totals: torch.Tensor | None = None
    """Device (3,) float64: summed loss, kept tokens, non-finite tokens since the last log."""
    counts: list = field(default_factory=lambda: [0, 0])
    """Host [label tokens, tokens] since the last log (known from the batches, no sync)."""

    @property
    def wants_argmax(self) -> bool:
        return self.k < 1.0 and self.rule == "speckd"

    def micro_step(self, accelerator, batch, lesson: Lesson, label_norm, n_micro: int,
                   sync: bool) -> None:
        """Forward, select, reduce and backpropagate one micro-batch.

        label_norm: the official normaliser (label tokens of the accumulated batch, over the
        processes, divided by their number), a number or a device tensor. sync: whether this
        micro-batch all-reduces the gradients (the last of an accumulated step).
        """
        context = contextlib.nullcontext() if sync else accelerator.no_sync(self.loss_model)
        with context:
            per_token, draft_argmax = self.loss_model(
                batch, target=lesson.target, target_logits=lesson.target_logits,
                want_argmax=self.wants_argmax)  # (N,) float32, (N,) int64 | None
            ranked = per_token.detach()
            if lesson.valid is not None:  # an emptied row counts as non-finite
                ranked = torch.where(lesson.valid, ranked, math.nan)
            keep = selection.select(
                self.rule, self.k, ranked, ref_loss=lesson.ref_loss, draft_argmax=draft_argmax,
                target_top1=lesson.target_top1() if self.wants_argmax else None,
                threshold=self._threshold(ranked, lesson.ref_loss))
            if self.normalize == "all":
                loss = selection.reduce_loss(per_token, keep, label_norm, "all")
            else:  # paper Eq. 10 per micro-batch, averaged over the accumulated ones
                loss = selection.reduce_loss(per_token, keep, 1, "selected") / n_micro
            accelerator.backward(loss)
        added = torch.stack([loss.detach().double(), keep.sum().double(),
                             (~torch.isfinite(ranked)).sum().double()])
        self.totals = added if self.totals is None else self.totals + added
        self.counts[0] += batch.n_labels
        self.counts[1] += batch.n_tokens

    def _threshold(self, draft_loss: torch.Tensor, ref_loss: torch.Tensor | None):
        """"batch", or for "global" the (1 - k) quantile of the deltas of the last
        GLOBAL_WINDOW micro-batches (this process's): a whole-data quantile of delta cannot be
        precomputed, since the draft changes as it trains."""
        if self.threshold != "global" or self.k == 1.0 or self.rule != "adaspec":
            return "batch"
        delta = (draft_loss - ref_loss).float()  # (N,) NaN where the loss is not finite
        self.window.append(torch.where(torch.isfinite(delta), delta, math.nan))
        return selection.global_threshold(torch.cat(list(self.window)), self.k)

    def optimizer_step(self, accelerator, max_grad_norm: float) -> None:
        if max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.loss_model.parameters(), max_grad_norm)
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16 overflow skips the step, and its LR
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def pop_metrics(self, accelerator) -> dict:
        """Totals since the last call, summed over processes: one host sync."""
        totals = accelerator.reduce(self.totals, "sum").tolist()
        labels_, tokens = self.counts
        if accelerator.num_processes > 1:
            labels_, tokens = accelerator.reduce(
                torch.tensor([labels_, tokens], dtype=torch.float64, device=accelerator.device),
                "sum").tolist()
        self.totals, self.counts = None, [0, 0]
        return {"loss_sum": totals[0], "kept": totals[1], "nonfinite_tokens": int(totals[2]),
                "label_tokens": labels_, "tokens": tokens}
