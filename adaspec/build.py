"""Phase 1: run a model over a task once and write what distillation needs into the cache.

`build_target` stores, per label token, the target's top-K log-probs and ids plus the tail mass
(or, in "sample" mode, tokens drawn from the target with their counts). `build_ref` stores a
trained reference draft's per-token losses against that cached target, computed with the same
sparse estimator the draft loss uses, without loading the target.

Determinism is what makes resume and multi-process builds exact: sequences are stored longest
first, cut into a fixed plan of batches, and every row is computed by the batch that holds it, so
the same rows come out whichever process, shard or restart computes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

import adaspec
from adaspec import losses, models, tasks
from adaspec.config import Config
from adaspec.errors import UserError
from cache_tools import schema, store
from cache_tools.errors import CacheError

LOGIT_ROWS = 1024  # label rows turned into full-vocabulary log-probs at a time (bounds memory)


# ---------------------------------------------------------------------------------------------
# Sequences and the batch plan


def order_sequences(
    tokenized: list[tasks.TokenizedExample],
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Longest first (stable), dropping sequences without label tokens at positions >= 1.

    Returns (input_ids per sequence (T,) int64, label_mask per sequence (T,) bool, source index).
    """
    kept = []
    for ex in tokenized:
        mask = np.asarray(ex.labels) != -100
        mask[:1] = False  # position 0 has no prefix to predict it from
        if mask.any():
            kept.append((np.asarray(ex.input_ids, dtype=np.int64), mask, ex.source_index))
    kept.sort(key=lambda item: -len(item[0]))
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) sequence ranges of at most `batch_tokens` padded tokens.

    `lengths` is sorted longest first, so a batch's first sequence sets its padded length.
    """
    batches, start, n = [], 0, len(lengths)
    while start < n:
        size = max(1, batch_tokens // int(lengths[start]))
        batches.append((start, min(n, start + size)))
        start += size
    return batches


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------
# Model outputs at label positions


def _pad_batch(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.from_numpy(s)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def _has_plain_head(model) -> bool:
    """True when logits are exactly output_embeddings(last hidden state) (no scaling/capping)."""
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return model.get_output_embeddings() is not None and model.base_model is not model


@torch.no_grad()
def label_hidden_and_head(model, seqs: list[np.ndarray], masks: list[np.ndarray], pad_id: int):
    """Run the model on a right-padded batch; return a function giving label-row logits.

    Row r corresponds to the r-th label position in sequence order; its logits are computed from
    the hidden state one position earlier. Only label rows go through the vocabulary head.
    Returns (n_rows, logits_fn) where logits_fn(start, stop) -> (stop - start, V') float32.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = _pad_batch(seqs, pad_id)
    rows_b, rows_t = [], []
    for b, mask in enumerate(masks):
        positions = np.nonzero(mask)[0]
        rows_b.append(np.full(len(positions), b))
        rows_t.append(positions - 1)
    index_b = torch.from_numpy(np.concatenate(rows_b)).to(device)
    index_t = torch.from_numpy(np.concatenate(rows_t)).to(device)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if _has_plain_head(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[index_b, index_t]
        head = model.get_output_embeddings()

        def logits_fn(start: int, stop: int) -> torch.Tensor:
            return head(hidden[start:stop]).float()
    else:
        logits = model(**inputs, use_cache=False).logits[index_b, index_t]

        def logits_fn(start: int, stop: int) -> torch.Tensor:
            return logits[start:stop].float()

    return len(index_b), logits_fn


# ---------------------------------------------------------------------------------------------
# Sparse target rows (pure tensor math)


def topk_rows(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """(n, V) logits -> ids (n, K) int64, logprobs (n, K) float32, tail_logmass (n,) float32.

    Log-probs come from the full-vocabulary log-softmax in float32; the tail is the log of the
    mass outside the top K, computed by logsumexp over the rest (no 1 - sum cancellation).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)  # sorted, largest first
    rest = logprobs.scatter(1, ids, float("-inf"))
    return {"ids": ids, "logprobs": values, "tail_logmass": torch.logsumexp(rest, dim=-1)}


def sample_rows(logits: torch.Tensor, n_samples: int, generator: torch.Generator) -> dict:
    """(n, V) logits -> `n_samples` draws with replacement per row, as unique ids with counts.

    Returns ids (n, S) int64, logprobs (n, S) float32 (true target log-probs of those ids) and
    counts (n, S) float32; unused slots have id 0, log-prob 0 and count 0.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    draws = torch.multinomial(logprobs.exp(), n_samples, replacement=True, generator=generator)
    draws, _ = torch.sort(draws, dim=-1)  # (n, S)
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = torch.cumsum(is_new.long(), dim=-1) - 1  # (n, S) slot of each draw's unique id
    counts = torch.zeros(draws.shape, dtype=torch.float32).scatter_add_(
        1, slot, torch.ones_like(draws, dtype=torch.float32)
    )
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    values = torch.where(counts > 0, logprobs.gather(1, ids), torch.zeros_like(counts))
    return {"ids": ids, "logprobs": values, "counts": counts}


# ---------------------------------------------------------------------------------------------
# The shard loop shared by both stages


@dataclass
class _Layout:
    """Where each sequence's label rows and each batch's sequences sit."""

    offsets_labels: np.ndarray  # (S+1,) label row offsets
    batches: list[tuple[int, int]]
    batch_of_seq: np.ndarray  # (S,) batch index of each sequence

    @classmethod
    def from_sequences(cls, label_offsets: np.ndarray, lengths: np.ndarray, batch_tokens: int):
        batches = plan_batches(lengths, batch_tokens)
        batch_of_seq = np.zeros(len(lengths), dtype=np.int64)
        for i, (a, b) in enumerate(batches):
            batch_of_seq[a:b] = i
        return cls(label_offsets, batches, batch_of_seq)

    def batches_for_rows(self, start: int, stop: int) -> list[int]:
        first = int(np.searchsorted(self.offsets_labels, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets_labels, stop, side="left"))  # exclusive
        return sorted(set(self.batch_of_seq[first:last].tolist()))

    def batch_rows(self, batch: int) -> tuple[int, int]:
        a, b = self.batches[batch]
        return int(self.offsets_labels[a]), int(self.offsets_labels[b])


def _run_shards(
    writer: store.StageWriter,
    layout: _Layout,
    shards: list[int],
    compute_batch: Callable[[int], tuple[dict[str, np.ndarray], int]],
    desc: str,
    disable_bar: bool,
) -> None:
    """Compute and write each shard; writing overlaps the next shard's compute.

    compute_batch(b) -> (rows of batch b as numpy arrays, tokens run through the model).
    """
    total = sum(writer.shard_range(s)[1] - writer.shard_range(s)[0] for s in shards)
    bar = tqdm(total=total, desc=desc, unit="row", disable=disable_bar, dynamic_ncols=True)
    writes: queue.Queue = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def writer_loop() -> None:
        while (item := writes.get()) is not None:
            try:
                writer.write_shard(*item)
            except BaseException as err:  # surfaced in the main thread below
                failure.append(err)

    thread = threading.Thread(target=writer_loop, daemon=True)
    thread.start()
    memo: tuple[int, dict] | None = None  # a batch straddling two shards is computed once
    tokens, started = 0, time.perf_counter()
    try:
        for shard in shards:
            start, stop = writer.shard_range(shard)
            parts: dict[str, list[np.ndarray]] = {}
            for batch in layout.batches_for_rows(start, stop):
                if memo is not None and memo[0] == batch:
                    rows = memo[1]
                else:
                    rows, batch_tokens = compute_batch(batch)
                    tokens += batch_tokens
                    memo = (batch, rows)
                b_start, b_stop = layout.batch_rows(batch)
                lo, hi = max(start, b_start) - b_start, min(stop, b_stop) - b_start
                for name, values in rows.items():
                    parts.setdefault(name, []).append(values[lo:hi])
                bar.update(hi - lo)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            if failure:
                raise failure[0]
            writes.put((shard, {name: np.concatenate(p) for name, p in parts.items()}))
    finally:
        writes.put(None)
        thread.join()
        bar.close()
    if failure:
        raise failure[0]


# ---------------------------------------------------------------------------------------------
# Coordination between processes


def _on_main(state: PartialState, fn: Callable[[], object]) -> object:
    """Run fn on the main process and hand its result (or its error) to every process."""
    payload: list[object] = [None]
    if state.is_main_process:
        try:
            payload = [("ok", fn())]
        except (UserError, CacheError) as err:
            payload = [("error", err)]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    status, value = payload[0]  # type: ignore[misc]
    if status == "error":
        raise value  # type: ignore[misc]
    return value


def _all_ok(state: PartialState, error: BaseException | None) -> None:
    """Raise on every process if any process failed (so nobody waits at a barrier forever)."""
    errors = (
        gather_object([str(error) if error else None])
        if state.num_processes > 1
        else [str(error) if error else None]
    )
    first = next((e for e in errors if e), None)
    if first:
        if error is not None:
            raise error
        raise CacheError(first)


# ---------------------------------------------------------------------------------------------
# Stages


def _sequence_params(cfg: Config, fingerprint: str, generate: dict | None = None) -> dict:
    d = cfg.data
    return {
        "task": d.task,
        "split": d.split,
        "template_version": tasks.template_version(d.task),
        "data_files_hash": tasks.data_files_hash(d.data_files) if d.data_files else None,
        "limit": d.limit,
        "max_length": d.max_length,
        "chat_template": d.chat_template,
        "seed": d.seed,
        "tokenizer_fingerprint": fingerprint,
        "generate": generate,
    }


def _ensure_sequences(group, cfg: Config, tokenizer, tokenized_fn, generate=None) -> dict:
    """Write the sequences stage (or check the stored one matches this run); main process only.

    tokenized_fn() -> list of TokenizedExample, called only when the stage must be written.
    """
    params = _sequence_params(cfg, models.tokenizer_fingerprint(tokenizer), generate)
    manifest = store.read_manifest(group)
    stage = manifest.get("stages", {}).get(schema.SEQUENCES, {})
    if stage.get("status") == schema.STATUS_COMPLETE:
        store.check_params(
            f"cache {cfg.data.task}/{cfg.data.split} sequences",
            stage["params"],
            params,
            "use a new --cache directory for other data, tokenizer or generation settings",
        )
        return manifest
    return _write_sequences_stage(group, cfg, tokenizer, tokenized_fn(), params)


def ensure_sequences(group, cfg: Config, tokenizer) -> dict:
    """The sequences stage of the task's own data."""

    def tokenized():
        examples = tasks.load_examples(
            cfg.data.task, cfg.data.split, cfg.data.data_files, cfg.data.limit, cfg.data.seed
        )
        return tasks.tokenize_examples(
            examples, tokenizer, cfg.data.max_length, cfg.data.chat_template
        )

    return _ensure_sequences(group, cfg, tokenizer, tokenized)


def _write_sequences_stage(group, cfg: Config, tokenizer, tokenized, params: dict) -> dict:
    input_ids, label_masks, source_index = order_sequences(tokenized)
    if not input_ids:
        raise UserError(f"task {cfg.data.task} split {cfg.data.split} gave no sequence with labels")
    vocab_size = models.real_vocab_size(tokenizer)
    counts = store.write_sequences(group, input_ids, label_masks, source_index, vocab_size)
    manifest = {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "package_version": adaspec.__version__,
        "task": cfg.data.task,
        "split": cfg.data.split,
        "vocab_size": vocab_size,
        "stages": {
            schema.SEQUENCES: {"status": schema.STATUS_COMPLETE, "params": params, "counts": counts}
        },
    }
    store.write_manifest(group, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Target-generated data (--generate)
#
# The target samples a response per prompt; the per-step distributions of that generation are
# the teacher-forced ones, so their sparse rows are kept as they come (no second forward pass).
# Each generation batch is staged as one .npz file (written atomically), which makes the pass
# resumable and splittable across processes; the staged rows then feed the ordinary target stage.
#
# Generation samples from exactly the distribution that is cached: logits cut to the tokenizer's
# ids (a padded head's extra rows can never be drawn), tempered by --gen-temperature and nothing
# else; the model's own generation_config.json (repetition penalty, top-k, min-p, ...) is ignored.
#
# The staging folder records the settings its batches were made with (params.json). A build whose
# settings differ discards stale batches and restages when nothing complete depends on them (the
# sequences stage is not written yet); once the sequences were written from them it refuses, as
# new generations would no longer match the stored sequences.

STAGING_PARAMS = "params.json"
STAGING_VERSION = 1  # bump when what a staged batch holds changes


def _staging_dir(cfg: Config) -> Path:
    if not store.is_local(cfg.cache.cache):
        raise UserError(
            "--generate needs a local --cache folder (its staging files live beside it)"
        )
    return (
        Path(cfg.cache.cache.removeprefix("file://"))
        / f".generate-{cfg.data.task}-{cfg.data.split}"
    )


def _generation_params(cfg: Config, identity: dict) -> dict:
    return {
        "model": identity,
        "temperature": cfg.cache.gen_temperature,
        "max_new_tokens": cfg.cache.gen_max_new_tokens,
        "seed": cfg.cache.seed,
    }


def _staging_params(cfg: Config, identity: dict, tokenizer, dtype: torch.dtype) -> dict:
    """Everything a staged batch depends on: which prompts, how they were generated (model and
    its weight hash, settings, compute dtype, the batch plan that sets each batch's seed) and how
    its rows were made sparse."""
    params = {
        **_generation_params(cfg, identity),
        **{k: v for k, v in _sequence_params(cfg, models.tokenizer_fingerprint(tokenizer)).items()
           if k not in ("seed", "generate")},
        "data_seed": cfg.data.seed,
        "vocab_size": models.real_vocab_size(tokenizer),
        "batch_tokens": cfg.cache.batch_tokens,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "mode": cfg.cache.sparse,
        "k": cfg.cache.topk,
        "staging_version": STAGING_VERSION,
    }
    return json.loads(json.dumps(params))  # as it reads back from params.json


def _prepare_staging(cfg: Config, staging: Path, params: dict) -> None:
    """Make `staging` hold only batches made with `params`; main process only.

    Batches of other settings are deleted (nothing complete depends on them) unless the split's
    sequences stage was written from them: then regenerating would break that stage, so refuse.
    """
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / STAGING_PARAMS
    try:
        stored = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # unreadable: as good as no record
        stored = None
    if stored == params:
        return
    batches = sorted(staging.glob("batch-*.npz"))
    manifest = store.read_manifest(_open_split(cfg))
    if store.stage_status(manifest, schema.SEQUENCES) == schema.STATUS_COMPLETE:
        if stored is not None:
            store.check_params(
                f"the staging folder {staging}",
                stored,
                params,
                "the cache's sequences were made from them: rerun with those settings, or use "
                "a new --cache directory",
            )
        # No record (staged before records were kept): these batches made the sequences; keep
        # them, and the check against the stored sequences catches any that do not match.
    else:
        for stale in batches:
            stale.unlink()
    tmp = staging / f"{STAGING_PARAMS}.tmp"
    tmp.write_text(json.dumps(params, indent=1, sort_keys=True))
    os.replace(tmp, path)


class _NonFiniteRow(Exception):
    """Row `row` of a block of logits has no finite distribution (NaN, +inf or all -inf)."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


def _nonfinite_error(cfg: Config, source: int, token: int, what: str) -> UserError:
    return UserError(
        f"the target gives non-finite logits (NaN or inf) at {what} {token} (0-based) of "
        f"{cfg.data.task}/{cfg.data.split} example {source}; nothing of it was stored and what "
        "was written before is kept: fix the model (or try --dtype float32), then rerun to resume"
    )


def _first_nonfinite_row(logits: torch.Tensor) -> int | None:
    """The first row whose log-softmax is undefined, or None.

    A row is sound when its largest logit is finite: -inf entries (masked ids) are then fine, but
    NaN anywhere (the max propagates it), +inf, or nothing but -inf leave no distribution, and the
    stored encodings would turn the NaN log-probs into p = 1.
    """
    bad = ~torch.isfinite(logits.amax(dim=-1))
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _row_fn(cfg: Config, vocab_size: int):
    """Full logits (n, V') -> sparse target rows as float32/int64 numpy (before encoding).

    Raises _NonFiniteRow (the row's index in the block) for a row with no finite distribution.
    """

    def rows_of(logits: torch.Tensor, generator: torch.Generator) -> dict[str, np.ndarray]:
        logits = models.cut_logits(logits, vocab_size).float().cpu()
        bad = _first_nonfinite_row(logits)
        if bad is not None:
            raise _NonFiniteRow(bad)
        if cfg.cache.sparse == "topk":
            rows = topk_rows(logits, cfg.cache.topk)
        else:
            rows = sample_rows(logits, cfg.cache.topk, generator)
        return {name: values.numpy() for name, values in rows.items()}

    return rows_of


def _generation_config(cfg: Config, eos: int | None, pad_id: int | None):
    """The whole documented generation setup: greedy, or plain sampling at --gen-temperature.

    Every knob that could reshape the distribution is set to its neutral value (the sampling-only
    ones when sampling: transformers warns about them otherwise, and greedy never reads them).
    Fields left None would be filled from the model's generation_config by `generate`, which
    `_own_generation_defaults` prevents.
    """
    from transformers import GenerationConfig

    settings = {
        "max_new_tokens": cfg.cache.gen_max_new_tokens,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "length_penalty": 1.0,
        "remove_invalid_values": False,
        "renormalize_logits": False,
        "use_cache": True,
        "eos_token_id": eos,
        "pad_token_id": pad_id,
        "output_logits": True,
        "return_dict_in_generate": True,
        "do_sample": cfg.cache.gen_temperature > 0,
    }
    if settings["do_sample"]:
        settings.update(
            temperature=cfg.cache.gen_temperature,
            top_k=0,
            top_p=1.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
    return GenerationConfig(**settings)


@contextlib.contextmanager
def _own_generation_defaults(model):
    """Stand a blank generation_config in for the model's while generating.

    `generate` fills every field the passed config leaves None (min_p, suppress_tokens,
    bad_words_ids, sequence_bias, stop_strings, ...) from `model.generation_config`; a blank one
    leaves them unset. The model's own is put back afterwards.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _vocab_guard(vocab_size: int, prompt_width: int, eos: int | None, on_bad: Callable):
    """A one-processor LogitsProcessorList that lets generation draw only ids the tokenizer has.

    Ids past `vocab_size` (a padded head's rows) get -inf, so greedy and sampled tokens come
    from the same cut distribution that is cached. A row of an unfinished sequence without a
    finite distribution calls `on_bad(batch row, step)` (which raises) before sampling chokes
    on it. The scores are not changed in place: generate keeps that tensor as the raw logits.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    class VocabGuard(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            new = input_ids[:, prompt_width:]
            running = torch.ones(len(new), dtype=torch.bool, device=new.device)
            if eos is not None:
                running &= ~(new == eos).any(dim=-1)
            bad = _first_nonfinite_row(models.cut_logits(scores, vocab_size)[running])
            if bad is not None:
                on_bad(int(running.nonzero()[bad, 0]), new.shape[1])
            if scores.shape[-1] == vocab_size:
                return scores
            guarded = scores.clone()
            guarded[:, vocab_size:] = float("-inf")
            return guarded

    return LogitsProcessorList([VocabGuard()])


@torch.no_grad()
def generate_batches(cfg: Config, model, tokenizer, state: PartialState, progress: bool,
                     identity: dict | None = None) -> None:
    """Sample the target's responses for the split's prompts and stage them (resumable).

    `identity` is the model's `models.model_identity` (default: that of cfg.models.target); with
    the settings it keys the staging folder (see `_prepare_staging`).
    """
    staging = _staging_dir(cfg)
    if identity is None:
        identity = models.model_identity(models.resolve_run_folder(cfg.models.target))
    dtype = next(model.parameters()).dtype
    params = _staging_params(cfg, identity, tokenizer, dtype)
    _on_main(state, lambda: _prepare_staging(cfg, staging, params))
    state.wait_for_everyone()
    examples = tasks.load_examples(
        cfg.data.task, cfg.data.split, cfg.data.data_files, cfg.data.limit, cfg.data.seed
    )
    budget = max(1, cfg.data.max_length - cfg.cache.gen_max_new_tokens)
    prompts = []
    for ex in examples:
        prompt_text, _ = tasks.render(ex, tokenizer, cfg.data.chat_template)
        ids = tokenizer(prompt_text).input_ids[-budget:]  # keep the end: it asks the question
        prompts.append((np.asarray(ids, dtype=np.int64), ex.source_index))
    prompts.sort(key=lambda item: -len(item[0]))
    width = len(prompts[0][0]) + cfg.cache.gen_max_new_tokens if prompts else 1
    per_batch = max(1, cfg.cache.batch_tokens // width)
    batches = [prompts[i : i + per_batch] for i in range(0, len(prompts), per_batch)]
    vocab_size = models.real_vocab_size(tokenizer)
    rows_of = _row_fn(cfg, vocab_size)
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen_config = _generation_config(cfg, eos, pad_id)
    device = next(model.parameters()).device
    mine = [i for i in range(len(batches)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not (staging / f"batch-{i:06d}.npz").exists()]
    bar = tqdm(
        total=len(todo),
        desc=f"generate {cfg.data.task}/{cfg.data.split}",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )
    for i in todo:
        batch = batches[i]
        longest = len(batch[0][0])
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, (ids, _) in enumerate(batch):  # left padding: generation continues every row
            input_ids[b, longest - len(ids) :] = torch.from_numpy(ids)
            attention_mask[b, longest - len(ids) :] = 1

        def on_bad(row: int, step: int, batch=batch) -> None:
            raise _nonfinite_error(cfg, batch[row][1], step, "response token")

        torch.manual_seed(cfg.cache.seed * 1_000_003 + i)
        with _own_generation_defaults(model):
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=gen_config,
                logits_processor=_vocab_guard(vocab_size, longest, eos, on_bad),
            )
        generated = out.sequences[:, longest:].cpu()  # (B, G)
        step_logits = torch.stack(out.logits, dim=1)  # (B, G, V') raw, untempered
        arrays: dict[str, list] = {"input_ids": [], "n_prompt": [], "source_index": []}
        rows: dict[str, list] = {}
        generator = torch.Generator().manual_seed(cfg.cache.seed * 1_000_003 + i)
        for b, (ids, source) in enumerate(batch):
            tokens = generated[b].tolist()
            n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            arrays["input_ids"].append(np.concatenate([ids, np.asarray(tokens[:n])]))
            arrays["n_prompt"].append(len(ids))
            arrays["source_index"].append(source)
            try:
                sparse = rows_of(step_logits[b, :n], generator)
            except _NonFiniteRow as err:
                raise _nonfinite_error(cfg, source, err.row, "response token") from None
            for name, values in sparse.items():
                rows.setdefault(name, []).append(values)
        lengths = np.array([len(x) for x in arrays["input_ids"]])
        payload = {
            "lengths": lengths,
            "input_ids": np.concatenate(arrays["input_ids"]),
            "n_prompt": np.array(arrays["n_prompt"]),
            "source_index": np.array(arrays["source_index"]),
            **{f"row_{name}": np.concatenate(v) for name, v in rows.items()},
        }
        tmp = staging / f"batch-{i:06d}.tmp.npz"
        np.savez(tmp, **payload)
        os.replace(tmp, staging / f"batch-{i:06d}.npz")  # atomic: a staged batch is whole
        bar.update(1)
    bar.close()


def load_generated(cfg: Config) -> dict[int, dict[str, np.ndarray]]:
    """Staged generations by source index: input_ids, label_mask and the sparse rows."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for path in sorted(_staging_dir(cfg).glob("batch-*[0-9].npz")):
        with np.load(path) as data:
            offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
            row = 0
            for j, source in enumerate(data["source_index"].tolist()):
                ids = data["input_ids"][offsets[j] : offsets[j + 1]]
                mask = np.zeros(len(ids), dtype=bool)
                mask[int(data["n_prompt"][j]) :] = True
                n = int(mask.sum())
                out[source] = {
                    "input_ids": ids,
                    "label_mask": mask,
                    **{k[4:]: data[k][row : row + n] for k in data.files if k.startswith("row_")},
                }
                row += n
    return out


def ensure_generated_sequences(group, cfg: Config, tokenizer, generated: dict, gen_params: dict):
    """The sequences stage of a --generate build: prompts plus the target's own responses."""

    def tokenized():
        return [
            tasks.TokenizedExample(
                g["input_ids"].tolist(),
                np.where(g["label_mask"], g["input_ids"], -100).tolist(),
                source,
            )
            for source, g in sorted(generated.items())
        ]

    return _ensure_sequences(group, cfg, tokenizer, tokenized, gen_params)


def _require_sequences(group, cfg: Config) -> dict:
    manifest = store.read_manifest(group)
    if store.stage_status(manifest, schema.SEQUENCES) != schema.STATUS_COMPLETE:
        raise UserError(
            f"the cache has no {cfg.data.task}/{cfg.data.split} sequences yet; run "
            f"`adaspec-cache build --model target --task {cfg.data.task}` first"
        )
    return manifest


def _open_split(cfg: Config):
    root = store.open_root(cfg.cache.cache, mode="a")
    return root.require_group(cfg.data.task).require_group(cfg.data.split)


def _begin_stage(group, stage: str, params: dict, n_rows: int, arrays, cfg: Config, fix: str,
                 rebuild: bool = False):
    """Create (or check and reopen) a row stage; main process only. Returns its manifest.

    `rebuild` discards a stored stage first (stale reference losses, a damaged chunk). The
    manifest says "building" before anything is deleted and the `_done` markers go first, so a
    rebuild that dies midway resumes by writing every shard again, never by trusting old ones.
    """
    manifest = store.read_manifest(group)
    entry = manifest["stages"].get(stage)
    if entry is not None and rebuild:
        manifest["stages"][stage] = {"status": schema.STATUS_BUILDING, "params": params}
        store.write_manifest(group, manifest)
        if stage in group:
            if schema.DONE in group[stage]:
                del group[stage][schema.DONE]
            del group[stage]
        entry = None
    if entry is not None:
        store.check_params(f"cache stage '{stage}'", entry["params"], params, fix)
    elif stage not in manifest["stages"]:
        manifest["stages"][stage] = {"status": schema.STATUS_BUILDING, "params": params}
        store.write_manifest(group, manifest)
    store.StageWriter(group, stage, n_rows, arrays, cfg.cache.shard_rows, cfg.cache.chunk_rows)
    return manifest


def _finish_stage(group, writer: store.StageWriter, stage: str, counts: dict) -> dict:
    manifest = store.read_manifest(group)
    if writer.all_done():
        manifest["stages"][stage]["status"] = schema.STATUS_COMPLETE
        manifest["stages"][stage]["counts"] = counts
        store.write_manifest(group, manifest)
    return manifest


def _load_sequences(group) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    seq = group[schema.SEQUENCES]
    offsets = seq["offsets"][:]
    ids = seq["input_ids"][:].astype(np.int64)
    mask = seq["label_mask"][:].astype(bool)
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))
    return [ids[a:b] for a, b in spans], [mask[a:b] for a, b in spans], seq["label_offsets"][:]


def _target_arrays(cfg: Config, vocab_size: int) -> dict[str, store.RowArray]:
    k = cfg.cache.topk
    arrays = {
        "ids": store.RowArray(schema.id_dtype(vocab_size), k),
        "logprobs": store.RowArray(schema.value_dtype(cfg.cache.value_encoding), k),
    }
    if cfg.cache.sparse == "topk":
        arrays["tail_logmass"] = store.RowArray(np.dtype(np.float32), None, float("-inf"))
    else:
        arrays["counts"] = store.RowArray(np.dtype(np.uint16), k)
    return arrays


LabelForward = Callable[[list[np.ndarray], list[np.ndarray], int], tuple[int, Callable]]


def build_stage(
    cfg: Config, role: str, model_spec: str | None = None, progress: bool = True,
    loaded: tuple | None = None, label_forward: LabelForward | None = None,
    rebuild: bool = False,
) -> dict:
    """Build (or resume) the `target` stage or a `ref/<name>` stage of one task/split.

    Works in one process or under `accelerate launch` (each process takes every N-th shard).
    Returns the split's manifest after the build. `rebuild` discards the stored stage first,
    whatever it holds (the sequences stay).

    For studies that build many caches of the same sequences (bench/fidelity.py):
    `loaded` is the (model, tokenizer) of `model_spec` already in memory (not loaded again; the
    caller keeps it in the dtype the config names, as the manifest records that), and
    `label_forward(seqs, masks, pad_id) -> (n_rows, logits_fn)` replaces
    `label_hidden_and_head(model, ...)` for the target stage, e.g. a memo of it.
    """
    if role not in ("target", "ref"):
        raise UserError(f"--model must be target or ref, got {role!r}")
    if label_forward is not None and (role != "target" or cfg.cache.generate):
        raise ValueError("label_forward replaces the target's forward; the ref stage and "
                         "--generate builds do not use it")
    # cpu=True on a CPU-only machine: otherwise a torchrun launch is not seen as distributed
    state = PartialState(cpu=not torch.cuda.is_available())
    with_lock_error: BaseException | None = None
    lock = store.build_lock(cfg.cache.cache, cfg.data.task, cfg.data.split, state.process_index)
    try:
        lock.__enter__()
    except CacheError as err:
        with_lock_error = err
    _all_ok(state, with_lock_error)
    try:
        return _build_locked(cfg, role, model_spec, state, progress, loaded, label_forward,
                             rebuild)
    finally:
        lock.__exit__(None, None, None)


def _build_locked(cfg, role, model_spec, state: PartialState, progress: bool,
                  loaded: tuple | None, label_forward: LabelForward | None,
                  rebuild: bool = False) -> dict:
    if role == "target":
        spec = model_spec or cfg.models.target
    else:
        spec = model_spec or cfg.models.ref or _recorded_ref(cfg)
    spec = models.resolve_run_folder(spec)  # an adaspec-train run folder: its model/
    identity = models.model_identity(spec)
    device = state.device
    dtype = resolve_dtype(cfg.models.dtype, device)
    device_map = cfg.models.device_map if role == "target" else None
    if loaded is not None:
        model, tokenizer = loaded
    else:
        model, tokenizer = models.load_model(spec, dtype=dtype, device_map=device_map)
    if device_map is None:
        model.to(device)
    model.eval()
    vocab_size = models.real_vocab_size(tokenizer)
    if role == "target" and cfg.cache.topk > vocab_size:
        raise UserError(f"--topk {cfg.cache.topk} exceeds the vocabulary size {vocab_size}")

    generated = None
    group = _open_split(cfg) if state.is_main_process else None
    if role == "target" and cfg.cache.generate:
        _together(state, lambda: generate_batches(cfg, model, tokenizer, state, progress, identity))
        state.wait_for_everyone()
        generated = load_generated(cfg)
        gen_params = _generation_params(cfg, identity)

        _on_main(
            state, lambda: ensure_generated_sequences(group, cfg, tokenizer, generated, gen_params)
        )
    elif role == "target":
        _on_main(state, lambda: ensure_sequences(group, cfg, tokenizer))
    else:  # a reference is scored on the sequences the target stage was built on, whatever flags
        _on_main(state, lambda: _require_sequences(group, cfg))
    state.wait_for_everyone()
    if group is None:
        group = _open_split(cfg)
    manifest = store.read_manifest(group)
    stored_fp = manifest["stages"][schema.SEQUENCES]["params"]["tokenizer_fingerprint"]
    if models.tokenizer_fingerprint(tokenizer) != stored_fp:
        raise UserError(
            f"{spec} uses another tokenizer than the cache's sequences; the draft, reference and "
            "target must share one tokenizer"
        )
    seqs, masks, label_offsets = _load_sequences(group)
    source_index = group[schema.SEQUENCES]["source_index"][:]
    if generated is not None:
        _check_generated(cfg, generated, seqs, source_index)
    n_rows = int(label_offsets[-1])
    layout = _Layout.from_sequences(
        label_offsets, np.array([len(s) for s in seqs]), cfg.cache.batch_tokens
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    if role == "target":
        stage = schema.TARGET
        params = {
            "model": identity,
            "mode": cfg.cache.sparse,
            "k": cfg.cache.topk,
            "value_encoding": cfg.cache.value_encoding,
            "id_encoding": cfg.cache.id_encoding,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "seed": cfg.cache.seed if cfg.cache.sparse == "sample" else None,
            "generate": _generation_params(cfg, identity) if cfg.cache.generate else None,
        }
        arrays = _target_arrays(cfg, vocab_size)
        fix = ("use a new --cache directory or the stored settings, or replace the stage with "
               "--rebuild (then rebuild its reference losses too)")
    else:
        target_entry = manifest["stages"].get(schema.TARGET, {})
        if target_entry.get("status") != schema.STATUS_COMPLETE:
            raise UserError(
                "the reference stage needs a complete target stage; run "
                f"`adaspec-cache build --model target --task {cfg.data.task}` first"
            )
        stage = schema.ref_group_name(cfg.cache.ref_name)
        params = {
            "model": identity,
            "target": target_entry["params"],
            "divergences": list(schema.DIVERGENCES),
        }
        arrays = {f"loss_{d}": store.RowArray(np.dtype(np.float32)) for d in schema.DIVERGENCES}
        fix = "use another --ref-name or the stored reference, or replace them with --rebuild"

    _on_main(state, lambda: _begin_stage(group, stage, params, n_rows, arrays, cfg, fix,
                                         rebuild))
    state.wait_for_everyone()
    writer = store.StageWriter(
        group, stage, n_rows, arrays, cfg.cache.shard_rows, cfg.cache.chunk_rows, create=False
    )
    shards = writer.pending_shards(state.process_index, state.num_processes)

    if role == "target" and generated is not None:
        compute = _staged_batch_fn(cfg, layout, seqs, source_index, generated, vocab_size)
    elif role == "target":
        if label_forward is None:
            def label_forward(seqs_, masks_, pad_id_):
                return label_hidden_and_head(model, seqs_, masks_, pad_id_)
        compute = _target_batch_fn(cfg, label_forward, seqs, masks, layout, pad_id, vocab_size)
    else:
        reader = store.CacheReader(cfg.cache.cache, cfg.data.task, cfg.data.split)
        compute = _ref_batch_fn(model, seqs, masks, layout, pad_id, vocab_size, reader)
    desc = f"{stage} {cfg.data.task}/{cfg.data.split}"
    if state.num_processes > 1:
        desc += f" [rank {state.process_index}]"

    def run() -> None:
        try:
            _run_shards(writer, layout, shards, compute, desc, disable_bar=not progress)
        except _NonFiniteRow as err:  # name the example; shards already written stay done
            s = int(np.searchsorted(label_offsets, err.row, side="right")) - 1
            token = err.row - int(label_offsets[s])
            raise _nonfinite_error(cfg, int(source_index[s]), token, "label token") from None

    _together(state, run)
    state.wait_for_everyone()
    counts = {"label_tokens": n_rows, "shards": writer.n_shards}
    return _on_main(state, lambda: _finish_stage(group, writer, stage, counts))  # type: ignore[return-value]


def _together(state: PartialState, fn: Callable[[], object]) -> None:
    """Run fn on every process; a user error on any process is raised on all of them, so none
    is left waiting at the next barrier."""
    error: BaseException | None = None
    try:
        fn()
    except (UserError, CacheError) as err:
        error = err
    _all_ok(state, error)


def _check_generated(cfg: Config, generated: dict, seqs: list[np.ndarray], source_index) -> None:
    """The staged generations must be the ones the stored sequences were made from."""
    for s, source in enumerate(source_index.tolist()):
        staged = generated.get(source)
        if staged is None or not np.array_equal(staged["input_ids"], seqs[s]):
            raise CacheError(
                f"the staged generations in {_staging_dir(cfg)} do not hold the cache's sequence "
                f"{s} (source index {source}); its target rows cannot be rebuilt from them: build "
                "into a new --cache directory"
            )


def _target_batch_fn(cfg, label_forward: LabelForward, seqs, masks, layout: _Layout, pad_id: int,
                     vocab_size: int):
    rows_of = _row_fn(cfg, vocab_size)

    @torch.no_grad()
    def compute(batch: int) -> tuple[dict[str, np.ndarray], int]:
        a, b = layout.batches[batch]
        n, logits_fn = label_forward(seqs[a:b], masks[a:b], pad_id)
        generator = torch.Generator().manual_seed(cfg.cache.seed * 1_000_003 + batch)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, LOGIT_ROWS):
            try:
                rows = rows_of(logits_fn(start, min(n, start + LOGIT_ROWS)), generator)
            except _NonFiniteRow as err:  # as a row of the stage, for _build_locked to name
                raise _NonFiniteRow(int(layout.offsets_labels[a]) + start + err.row) from None
            for name, values in rows.items():
                parts.setdefault(name, []).append(values)
        out = _encode_rows(cfg, {name: np.concatenate(v) for name, v in parts.items()}, vocab_size)
        return out, sum(len(s) for s in seqs[a:b])

    return compute


def _encode_rows(cfg: Config, rows: dict[str, np.ndarray], vocab_size: int) -> dict:
    """float32/int64 sparse rows -> the stored dtypes and encodings."""
    out = dict(rows)
    out["ids"], out["logprobs"], counts = schema.encode_rows(
        out["ids"], out["logprobs"], out.get("counts"), cfg.cache.id_encoding
    )
    out["logprobs"] = schema.encode_logprobs(out["logprobs"], cfg.cache.value_encoding)
    out["ids"] = out["ids"].astype(schema.id_dtype(vocab_size))
    if counts is not None:
        out["counts"] = counts.astype(np.uint16)
    if "tail_logmass" in out:
        out["tail_logmass"] = out["tail_logmass"].astype(np.float32)
    return out


def _staged_batch_fn(cfg, layout: _Layout, seqs, source_index, generated: dict, vocab_size: int):
    """Rows of a plan batch taken from the staged generations (no model call)."""

    def compute(batch: int) -> tuple[dict[str, np.ndarray], int]:
        a, b = layout.batches[batch]
        parts = [generated[int(source_index[s])] for s in range(a, b)]
        names = [k for k in parts[0] if k not in ("input_ids", "label_mask")]
        rows = {name: np.concatenate([p[name] for p in parts]) for name in names}
        return _encode_rows(cfg, rows, vocab_size), 0

    return compute


def _ref_batch_fn(model, seqs, masks, layout: _Layout, pad_id: int, vocab_size: int, reader):
    @torch.no_grad()
    def compute(batch: int) -> tuple[dict[str, np.ndarray], int]:
        a, b = layout.batches[batch]
        n, logits_fn = label_hidden_and_head(model, seqs[a:b], masks[a:b], pad_id)
        row0 = int(layout.offsets_labels[a])
        parts: dict[str, list[np.ndarray]] = {f"loss_{d}": [] for d in schema.DIVERGENCES}
        for start in range(0, n, LOGIT_ROWS):
            stop = min(n, start + LOGIT_ROWS)
            logits = models.cut_logits(logits_fn(start, stop), vocab_size).cpu()
            target = sparse_target_from_rows(reader.target_rows(row0 + start, row0 + stop))
            for d in schema.DIVERGENCES:
                loss = losses.sparse_divergence(logits, target, divergence=d)
                parts[f"loss_{d}"].append(loss.numpy().astype(np.float32))
        return {k: np.concatenate(v) for k, v in parts.items()}, sum(len(s) for s in seqs[a:b])

    return compute


def sparse_target_from_rows(rows: dict[str, np.ndarray]) -> losses.SparseTarget:
    """Decoded cache rows (see `CacheReader.target_rows`) -> a torch SparseTarget."""
    tail = rows.get("tail_logmass")
    counts = rows.get("counts")
    return losses.SparseTarget(
        ids=torch.from_numpy(rows["ids"]),
        logprobs=torch.from_numpy(rows["logprobs"]),
        tail_logmass=None if tail is None else torch.from_numpy(tail),
        counts=None if counts is None else torch.from_numpy(counts),
    )


def _recorded_ref(cfg: Config) -> str:
    """The reference the ref training stage recorded in the cache manifest."""
    try:
        root = store.open_root(cfg.cache.cache, mode="r")
        manifest = store.read_manifest(root[store.split_path(cfg.data.task, cfg.data.split)])
    except (CacheError, KeyError):
        manifest = {}
    recorded = manifest.get("refs", {}).get(cfg.cache.ref_name)
    if not recorded:
        raise UserError(
            "no reference model: train one with `adaspec-train --stage ref` or pass --model-path"
        )
    return recorded["path"]
