"""Phase 1: run a model over a task once and write what distillation needs into the cache.

`build_stage(cfg, "target")` stores, per label token, the target's top-K log-probs and ids plus the
tail mass (or, in "sample" mode, tokens drawn from the target with their counts). With
`--generate` the target first writes its own responses (`generate.py`) and the rows come from
that generation. `build_stage(cfg, "ref")` stores a trained reference draft's per-token losses
against that cached target, computed with the same sparse estimator the draft loss uses, without
loading the target.

Determinism is what makes resume and multi-process builds exact: sequences are stored longest
first, cut into a fixed plan of batches, and every row is computed by the batch that holds it, so
the same rows come out whichever process, shard or restart computes them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState

import adaspec
from adaspec import generate, labels, losses, models, processes, provenance, runs, sparse, tasks
from adaspec.config import Config
from adaspec.errors import UserError
from adaspec.shard_loop import BatchLayout, run_shards
from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.manifest import Manifest
from cache_tools.store import CacheReader, CacheWriter, StageWriter

LOGIT_ROWS = 1024  # label rows turned into full-vocabulary log-probs at a time (bounds memory)
SEQUENCES_FIX = "use a new --cache directory for other data, tokenizer or generation settings"


# ---------------------------------------------------------------------------------------------
# Sequences


def sequence_params(cfg: Config, fingerprint: str, generate: dict | None = None,
                    tokenizer=None) -> dict:
    """What a split's sequences are made from, as the manifest records it; for conversations
    also the chat template that rendered them (from `tokenizer`: the tokenizer fingerprint
    does not cover it)."""
    d = cfg.data
    chat = {}
    if tokenizer is not None and tasks.lookup(d.task).conversations:
        template = getattr(tokenizer, "chat_template", None) or ""
        chat = {"chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()}
    return {
        "task": d.task,
        "split": d.split,
        "template_version": tasks.template_version(d.task),
        "data_files_hash": tasks.data_files_hash(d.data_files) if d.data_files else None,
        "limit": d.limit,
        "max_length": d.max_length,
        "chat_template": d.chat_template,
        "seed": d.seed,
        schema.TOKENIZER_FINGERPRINT: fingerprint,
        "generate": generate,
        **chat,
    }


# how a conversation's tokenization or regeneration was cut -> its count in the manifest
_CONVERSATION_COUNTS = {"turns": "conversations_cut", "too_long": "conversations_skipped",
                        "regenerated_cut": "regenerated_cut",
                        "regenerated_empty": "regenerated_skipped"}


def _texts(tokenized: list, source_index: list[int]) -> list[str] | None:
    """Each stored sequence's text record (conversations), in stored order; None for a task
    that keeps none."""
    by_source = {t.source_index: t.text for t in tokenized}
    texts = [by_source[s] for s in source_index]
    return None if any(text is None for text in texts) else texts


def ensure_sequences(writer: CacheWriter, cfg: Config, tokenizer, params: dict,
                     tokenized_fn: Callable[[], list], rebuild: bool = False,
                     notes: Counter | None = None) -> None:
    """Write the sequences (or check the stored ones match `params`); main process only.

    tokenized_fn() -> list of TokenizedExample, called only when the sequences must be written.
    With `rebuild`, stored sequences that cannot be read (a damaged or missing chunk) are
    written again from the data: the same settings make the same sequences, so the row stages
    built on them stay valid (the counts are checked before anything is overwritten).
    `notes`, filled by tokenized_fn (conversations), become counts of the sequences stage.
    """
    if writer.check_sequences(params, SEQUENCES_FIX):
        if rebuild and not writer.sequences_readable():
            tokenized = tokenized_fn()
            ids, masks, source_index = labels.order_sequences(tokenized)
            writer.repair_sequences(ids, masks, source_index, models.real_vocab_size(tokenizer),
                                    _texts(tokenized, source_index))
        return
    tokenized = tokenized_fn()
    input_ids, label_masks, source_index = labels.order_sequences(tokenized)
    if not input_ids:
        raise UserError(f"task {cfg.data.task} split {cfg.data.split} gave no sequence with labels")
    texts = _texts(tokenized, source_index)
    extra = None
    if texts is not None:
        extra = {name: int((notes or {}).get(note, 0))
                 for note, name in _CONVERSATION_COUNTS.items()}
    writer.write_sequences(input_ids, label_masks, source_index,
                           models.real_vocab_size(tokenizer), params, adaspec.__version__,
                           texts=texts, extra_counts=extra)


# ---------------------------------------------------------------------------------------------
# Stages


def build_stage(cfg: Config, role: str, model_spec: str | None = None, progress: bool = True,
                rebuild: bool = False) -> Manifest:
    """Build (or resume) the `target` stage or a `ref/<name>` stage of one task/split.

    Works in one process or under `accelerate launch` (each process takes every N-th shard).
    Returns the split's manifest after the build. `rebuild` discards the stored stage first,
    whatever it holds (the sequences stay). `model_spec` may be a training run folder.
    """
    if role not in ("target", "ref"):
        raise UserError(f"--model must be target or ref, got {role!r}")
    tasks.check_files(cfg.data.data_files)  # before a model loads (a minute for a GGUF target)
    # cpu=True on a CPU-only machine: otherwise a torchrun launch is not seen as distributed
    state = PartialState(cpu=not torch.cuda.is_available())
    # The root is created once, before every process takes its lease in it.
    processes.on_main(state, lambda: store.open_root(cfg.cache.cache, "a"))
    lock_error: BaseException | None = None
    lock = store.build_lock(cfg.cache.cache, cfg.data.task, cfg.data.split, state.process_index)
    lease = None
    try:
        lease = lock.__enter__()
    except CacheError as err:
        lock_error = _busy_error(cfg, role, err)
    try:
        processes.raise_if_any(state, lock_error)
        build = _build_target if role == "target" else _build_ref
        return build(cfg, model_spec, state, progress, rebuild, lease.check)
    finally:
        if lease is not None:
            lock.__exit__(None, None, None)


def _busy_error(cfg: Config, role: str, err: CacheError) -> CacheError:
    """The lock is held: say so, and when the stage asked for is already complete, that the
    other build has nothing to write either (it is checking the stored settings)."""
    stage = schema.TARGET if role == "target" else schema.ref_group_name(cfg.cache.ref_name)
    try:
        complete = provenance.reader_of(cfg, require=()).manifest.is_complete(stage)
    except CacheError:
        complete = False
    if complete:
        return CacheError(
            f"another build holds {cfg.cache.cache}/{cfg.data.task}/{cfg.data.split}, whose "
            f"'{stage}' stage is already complete (that build is checking its settings; "
            "nothing is being written unless they differ): run again once it has finished")
    return err


@dataclass
class _Model:
    """The model a stage runs, as loaded for it."""

    spec: str
    identity: dict
    model: object
    tokenizer: object
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return models.real_vocab_size(self.tokenizer)

    @property
    def device(self) -> torch.device:
        """Where the model's outputs come out (its last parameters' device)."""
        return next(self.model.get_output_embeddings().parameters()).device \
            if self.model.get_output_embeddings() is not None \
            else next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0


def _load(cfg: Config, spec: str, state: PartialState, device_map: str | None) -> _Model:
    spec = runs.resolve_run_folder(spec)  # an adaspec-train run folder: its model/
    identity = models.model_identity(spec)
    dtype = models.resolve_dtype(cfg.models.dtype, state.device)
    model, tokenizer = models.load_frozen(spec, dtype, state.device, device_map)
    return _Model(spec, identity, model, tokenizer, dtype)


def _build_target(cfg: Config, model_spec: str | None, state: PartialState, progress: bool,
                  rebuild: bool, guard: Callable[[], None]) -> Manifest:
    loaded = _load(cfg, model_spec or cfg.models.target, state, cfg.models.device_map)
    if cfg.cache.k > loaded.vocab_size:
        flag = "--topk" if cfg.cache.sparse == "topk" else "--draws"
        raise UserError(f"{flag} {cfg.cache.k} exceeds the vocabulary size {loaded.vocab_size}")
    writer = CacheWriter(cfg.cache.cache, cfg.data.task, cfg.data.split)
    fingerprint = models.tokenizer_fingerprint(loaded.tokenizer)
    generated = gen_identity = None
    conversations = tasks.lookup(cfg.data.task).conversations
    notes: Counter = Counter()  # how conversations were cut (`ensure_sequences`)
    if cfg.cache.generate:
        writer_model = loaded
        if cfg.cache.generator != "target":  # on-policy: another model writes the responses
            spec = cfg.models.draft if cfg.cache.generator == "draft" else (
                cfg.models.ref or _recorded_ref(cfg))
            writer_model = _load(cfg, spec, state, None)
            models.check_same_tokenizer(writer_model.tokenizer, fingerprint,
                                        f"--generator model {writer_model.spec}", "the target")
        gen_identity = writer_model.identity
        gen_params = generate.generation_params(cfg, gen_identity)
        seq_params = sequence_params(cfg, fingerprint, gen_params, loaded.tokenizer)
        if conversations:  # every assistant turn rewritten; the target scores them below
            processes.together(state, lambda: generate.regenerate_conversations(
                cfg, writer_model.model, writer_model.tokenizer, state, progress, gen_identity,
                sequence_params(cfg, fingerprint, None, loaded.tokenizer)))
            state.wait_for_everyone()
            del writer_model
            processes.on_main(state, lambda: ensure_sequences(
                writer, cfg, loaded.tokenizer, seq_params,
                lambda: generate.regenerated_split(cfg, loaded.tokenizer, notes), rebuild, notes))
        else:
            processes.together(state, lambda: generate.generate_batches(
                cfg, writer_model.model, writer_model.tokenizer, state, progress, gen_identity,
                sequence_params(cfg, fingerprint)))
            state.wait_for_everyone()
            del writer_model
            generated = generate.load_generated(cfg)
            processes.on_main(state, lambda: ensure_sequences(
                writer, cfg, loaded.tokenizer, seq_params,
                lambda: generate.generated_examples(generated), rebuild))
    else:
        processes.on_main(state, lambda: ensure_sequences(
            writer, cfg, loaded.tokenizer,
            sequence_params(cfg, fingerprint, None, loaded.tokenizer),
            lambda: tasks.tokenize_split(cfg.data, loaded.tokenizer, notes), rebuild, notes))
    state.wait_for_everyone()
    reader = provenance.reader_of(cfg, require=())
    models.check_same_tokenizer(loaded.tokenizer, reader.tokenizer_fingerprint, loaded.spec,
                                "the cache's sequences")
    seqs, masks = reader.sequence_lists()
    label_offsets = reader.label_offsets
    if generated is not None:
        generate.check_generated(cfg, generated, seqs, reader.source_index)
    c = cfg.cache
    params = {
        "model": loaded.identity,
        schema.MODE: c.sparse,
        schema.K: c.k,
        schema.VALUE_ENCODING: c.value_encoding,
        schema.ID_ENCODING: c.id_encoding,
        "compute_dtype": str(loaded.dtype).removeprefix("torch."),
        "seed": c.seed if c.sparse == "sample" else None,
        "generate": generate.generation_params(cfg, gen_identity) if c.generate else None,
    }
    fix = ("use a new --cache directory or the stored settings, or replace the stage with "
           "--rebuild (then rebuild its reference losses too)")
    layout = BatchLayout.from_sequences(label_offsets, np.array([len(s) for s in seqs]),
                                    c.batch_tokens)
    if generated is not None and cfg.cache.generator == "target":  # rows came with them
        compute = _staged_batch_fn(layout, reader.source_index, generated)
    else:  # the task's data, or another model's responses: the target scores them now
        compute = target_batch_fn(cfg, loaded, seqs, masks, layout)
    return _write_stage(cfg, state, writer, schema.TARGET, params, loaded.vocab_size, fix,
                        rebuild, layout, compute, reader, progress, guard)


def _build_ref(cfg: Config, model_spec: str | None, state: PartialState, progress: bool,
               rebuild: bool, guard: Callable[[], None]) -> Manifest:
    spec = model_spec or cfg.models.ref or _recorded_ref(cfg)
    loaded = _load(cfg, spec, state, None)
    # A reference is scored on the sequences the target stage was built on, whatever flags say.
    try:
        reader = provenance.reader_of(cfg, require=())
    except CacheError:
        raise UserError(
            f"the cache has no {cfg.data.task}/{cfg.data.split} sequences yet; run "
            f"`adaspec-cache build --model target --task {cfg.data.task}` first"
        ) from None
    models.check_same_tokenizer(loaded.tokenizer, reader.tokenizer_fingerprint, loaded.spec,
                                "the cache's sequences")
    if not reader.manifest.is_complete(schema.TARGET):
        raise UserError(
            "the reference stage needs a complete target stage; run "
            f"`adaspec-cache build --model target --task {cfg.data.task}` first"
        )
    seqs, masks = reader.sequence_lists()
    label_offsets = reader.label_offsets
    params = {
        "model": loaded.identity,
        "target": reader.target_params,
        "divergences": list(schema.DIVERGENCES),
    }
    fix = "use another --ref-name or the stored reference, or replace them with --rebuild"
    layout = BatchLayout.from_sequences(label_offsets, np.array([len(s) for s in seqs]),
                                    cfg.cache.batch_tokens)
    compute = _ref_batch_fn(loaded, seqs, masks, layout, reader)
    writer = CacheWriter(cfg.cache.cache, cfg.data.task, cfg.data.split)
    return _write_stage(cfg, state, writer, schema.ref_group_name(cfg.cache.ref_name), params,
                        loaded.vocab_size, fix, rebuild, layout, compute, reader, progress,
                        guard)


def _write_stage(cfg: Config, state: PartialState, writer: CacheWriter, stage: str, params: dict,
                 vocab_size: int, fix: str, rebuild: bool, layout: BatchLayout, compute,
                 reader: CacheReader, progress: bool, guard: Callable[[], None]) -> Manifest:
    """Open (or resume) a row stage, compute this process's pending shards, finish it;
    `guard()` (the build lease's check) runs before each shard is written and before finishing."""
    c = cfg.cache

    def open_stage(create: bool) -> StageWriter:
        return writer.open_stage(stage, params, vocab_size, c.shard_rows, c.chunk_rows,
                                 create=create, rebuild=rebuild and create, fix=fix)

    def create() -> None:
        open_stage(True)

    processes.on_main(state, create)
    state.wait_for_everyone()
    stage_writer = open_stage(False)
    shards = stage_writer.pending_shards(state.process_index, state.num_processes)
    desc = f"{stage} {cfg.data.task}/{cfg.data.split}"
    if state.num_processes > 1:
        desc += f" [rank {state.process_index}]"

    def run() -> None:
        try:
            run_shards(stage_writer, layout, shards, compute, desc, disable_bar=not progress,
                       before_write=guard)
        except sparse.NonFiniteRow as err:  # name the example; shards already written stay done
            s = int(np.searchsorted(reader.label_offsets, err.row, side="right")) - 1
            token = err.row - int(reader.label_offsets[s])
            raise generate.nonfinite_error(cfg, int(reader.source_index[s]), token,
                                           "label token") from None

    processes.together(state, run)
    state.wait_for_everyone()
    def finish() -> None:
        guard()
        stage_writer.finish()

    processes.on_main(state, finish)
    state.wait_for_everyone()
    return writer.manifest


def target_batch_fn(cfg: Config, loaded: _Model, seqs, masks, layout: BatchLayout):
    """compute(b) -> (the computed target rows of plan batch b, tokens run through the model);
    the stage writer encodes them."""

    @torch.no_grad()
    def compute(batch: int) -> tuple[dict[str, np.ndarray], int]:
        a, b = layout.batches[batch]
        logits = labels.LabelLogits(loaded.model, labels.pad_batch(seqs[a:b], masks[a:b],
                                                                   loaded.pad_id))
        n = logits.n_rows
        generator = generate.row_generator(cfg, loaded.device, batch)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, LOGIT_ROWS):
            try:
                rows = generate.logits_to_rows(cfg, loaded.vocab_size,
                                               logits(start, min(n, start + LOGIT_ROWS)),
                                               generator)
            except sparse.NonFiniteRow as err:  # as a row of the stage, for the caller to name
                raise sparse.NonFiniteRow(int(layout.offsets_labels[a]) + start + err.row) from None
            for name, values in rows.items():
                parts.setdefault(name, []).append(values)
        rows = {name: np.concatenate(v) for name, v in parts.items()}
        return rows, sum(len(s) for s in seqs[a:b])

    return compute


def _staged_batch_fn(layout: BatchLayout, source_index, generated: dict):
    """Rows of a plan batch taken from the staged generations (no model call)."""

    def compute(batch: int) -> tuple[dict[str, np.ndarray], int]:
        a, b = layout.batches[batch]
        parts = [generated[int(source_index[s])] for s in range(a, b)]
        names = [k for k in parts[0] if k not in ("input_ids", "label_mask")]
        rows = {name: np.concatenate([p[name] for p in parts]) for name in names}
        return rows, 0

    return compute


def _ref_batch_fn(loaded: _Model, seqs, masks, layout: BatchLayout, reader: CacheReader):
    @torch.no_grad()
    def compute(batch: int) -> tuple[dict[str, np.ndarray], int]:
        a, b = layout.batches[batch]
        logits = labels.LabelLogits(loaded.model, labels.pad_batch(seqs[a:b], masks[a:b],
                                                                   loaded.pad_id),
                                    loaded.vocab_size)
        n = logits.n_rows
        row0 = int(layout.offsets_labels[a])
        parts: dict[str, list[np.ndarray]] = {f"loss_{d}": [] for d in schema.DIVERGENCES}
        for start in range(0, n, LOGIT_ROWS):
            stop = min(n, start + LOGIT_ROWS)
            reduced = logits.reduced_head  # a reduced-vocabulary reference: its own loss
            block = logits.restricted(start, stop) if reduced is not None \
                else logits(start, stop)  # (n, V) or (n, N + 1) float32 on the model's device
            target = sparse.from_rows(reader.target_rows(row0 + start, row0 + stop))
            target = target.to(block.device)
            for d in schema.DIVERGENCES:
                loss = losses.sparse_divergence(block, target, divergence=d) if reduced is None \
                    else losses.restricted_divergence(block, target, reduced.to_draft, d)
                parts[f"loss_{d}"].append(loss.cpu().numpy().astype(np.float32))
        return {k: np.concatenate(v) for k, v in parts.items()}, sum(len(s) for s in seqs[a:b])

    return compute


def _recorded_ref(cfg: Config) -> str:
    """The reference the ref training stage recorded in the cache manifest."""
    try:
        recorded = provenance.reader_of(cfg, require=()).recorded_refs.get(cfg.cache.ref_name)
    except CacheError:
        recorded = None
    if not recorded:
        raise UserError(
            "no reference model: train one with `adaspec-train --stage ref` or pass --model-path"
        )
    return recorded["path"]
