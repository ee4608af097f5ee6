"""Target-generated training data (`adaspec-cache build --generate`), staged for the cache.

The target samples a response per prompt; the per-step distributions of that generation are the
teacher-forced ones, so their sparse rows are kept as they come (no second forward pass). With
`--generator draft` (or `ref`) that model writes the responses instead (on-policy data, as
DistillSpec recommends) and the target scores them once, teacher-forced, in the target stage:
on-policy distillation then runs from the cache like everything else. Each
generation batch is staged as one .npz file (written atomically) in a folder beside the cache,
which makes the pass resumable and splittable across processes; the build then writes the staged
prompts + responses as the split's sequences and the staged rows as its target stage.

Generation samples from exactly the distribution that is cached: logits cut to the tokenizer's ids
(a padded head's extra rows can never be drawn), tempered by --gen-temperature and nothing else;
the model's own generation_config.json (repetition penalty, top-k, min-p, ...) is ignored.

The staging folder records the settings its batches were made with (params.json). A build whose
settings differ discards stale batches and restages when nothing complete depends on them (the
sequences are not written yet); once the sequences were written from them it refuses, as new
generations would no longer match the stored sequences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from adaspec import models, processes, sparse, tasks
from adaspec.config import Config
from adaspec.errors import UserError
from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.store import CacheWriter

GENERATORS = ("target", "draft", "ref")  # who writes the responses of --generate
STAGING_PARAMS = "params.json"
STAGING_VERSION = 1  # bump when what a staged batch holds changes


def staging_dir(cfg: Config) -> Path:
    """Where a split's staged generations live: in a folder beside the cache's
    (`<cache>.staging/<task>-<split>`), so the cache stays a clean Zarr hierarchy and the
    processes of a build (all of whom see the cache's folder) share it."""
    if not store.is_local(cfg.cache.cache):
        raise UserError(
            "--generate needs a local --cache folder (its staging files live beside it)"
        )
    root = Path(cfg.cache.cache.removeprefix("file://")).resolve()
    legacy = root / f".generate-{cfg.data.task}-{cfg.data.split}"  # where earlier versions staged
    if legacy.is_dir():
        return legacy
    return root.with_name(root.name + ".staging") / f"{cfg.data.task}-{cfg.data.split}"


def generation_params(cfg: Config, identity: dict) -> dict:
    """How the responses were generated, as the manifest records it (`identity`: the model that
    wrote them)."""
    return {
        "generator": cfg.cache.generator,
        "model": identity,
        "temperature": cfg.cache.gen_temperature,
        "max_new_tokens": cfg.cache.gen_max_new_tokens,
        "seed": cfg.cache.seed,
    }


def _staging_params(cfg: Config, identity: dict, tokenizer, dtype: torch.dtype,
                    sequence_params: dict) -> dict:
    """Everything a staged batch depends on: which prompts, how they were generated (model and
    its weight hash, settings, compute dtype, the batch plan that sets each batch's seed) and how
    its rows were made sparse."""
    params = {
        **generation_params(cfg, identity),
        **{k: v for k, v in sequence_params.items() if k not in ("seed", "generate")},
        "data_seed": cfg.data.seed,
        "vocab_size": models.real_vocab_size(tokenizer),
        "batch_tokens": cfg.cache.batch_tokens,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "mode": cfg.cache.sparse,
        "k": cfg.cache.k,
        "staging_version": STAGING_VERSION,
    }
    return json.loads(json.dumps(params))  # as it reads back from params.json


def _prepare_staging(cfg: Config, staging: Path, params: dict) -> None:
    """Make `staging` hold only batches made with `params`; main process only.

    Batches of other settings are deleted (nothing complete depends on them) unless the split's
    sequences stage was written from them: then regenerating would break that stage, so refuse.
    """
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the generation staging folder {staging} "
                        f"({err.strerror}); --generate stages beside the --cache folder, which "
                        "must be writable there") from None
    path = staging / STAGING_PARAMS
    try:
        stored = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # unreadable: as good as no record
        stored = None
    if stored == params:
        return
    batches = sorted(staging.glob("batch-*"))  # .npz, or .json for conversations
    writer = CacheWriter(cfg.cache.cache, cfg.data.task, cfg.data.split)
    if writer.manifest.is_complete(schema.SEQUENCES):
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


def nonfinite_error(cfg: Config, source: int, token: int, what: str) -> UserError:
    """The one-line error for a target that gives NaN/inf logits, naming the example."""
    return UserError(
        f"the target gives non-finite logits (NaN or inf) at {what} {token} (0-based) of "
        f"{cfg.data.task}/{cfg.data.split} example {source}; nothing of it was stored and what "
        "was written before is kept: fix the model (or try --dtype float32), then rerun to resume"
    )


def logits_to_rows(cfg: Config, vocab_size: int, logits: torch.Tensor,
                   generator: torch.Generator) -> dict[str, np.ndarray]:
    """Full logits (n, V') -> the cache's sparse rows as float32/int64 numpy (not encoded).

    The rows are made where the logits are (a GPU's log-softmax, top-K and sampling take
    milliseconds; a CPU's, most of a build) and only the K entries per row come to the host;
    `generator` must be on the logits' device (`row_generator`). Raises sparse.NonFiniteRow
    (the row's index in the block) for a row with no distribution.
    """
    logits = models.cut_logits(logits, vocab_size).float()
    rows = sparse.cache_rows(logits, cfg.cache.sparse, cfg.cache.k, generator)
    return {name: values.cpu().numpy() for name, values in rows.items()}


def row_generator(cfg: Config, device, index: int) -> torch.Generator:
    """The seeded generator of batch `index`'s draws, on the device the rows are made on (a
    build on CUDA draws other samples than one on CPU; each is deterministic)."""
    return torch.Generator(device=device).manual_seed(cfg.cache.seed * 1_000_003 + index)


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
            bad = sparse.first_nonfinite_row(models.cut_logits(scores, vocab_size)[running])
            if bad is not None:
                on_bad(int(running.nonzero()[bad, 0]), new.shape[1])
            if scores.shape[-1] == vocab_size:
                return scores
            guarded = scores.clone()
            guarded[:, vocab_size:] = float("-inf")
            return guarded

    return LogitsProcessorList([VocabGuard()])


def _prompt_batches(cfg: Config, tokenizer) -> list[list[tuple[np.ndarray, int]]]:
    """The split's prompts (ids, source index), longest first, in batches that leave room for
    the responses within --batch-tokens."""
    examples = tasks.load_split(cfg.data)
    budget = max(1, cfg.data.max_length - cfg.cache.gen_max_new_tokens)
    prompts = []
    for ex in examples:
        ids = tasks.prompt_ids(ex, tokenizer, cfg.data.chat_template, budget)
        prompts.append((np.asarray(ids, dtype=np.int64), ex.source_index))
    prompts.sort(key=lambda item: -len(item[0]))
    width = len(prompts[0][0]) + cfg.cache.gen_max_new_tokens if prompts else 1
    per_batch = max(1, cfg.cache.batch_tokens // width)
    return [prompts[i : i + per_batch] for i in range(0, len(prompts), per_batch)]


def _generate_batch(cfg: Config, model, tokenizer, batch: list[tuple[np.ndarray, int]],
                    index: int) -> dict[str, np.ndarray]:
    """Generate one batch's responses (and, when the target generates, their sparse rows):
    the payload of a staged file."""
    vocab_size = models.real_vocab_size(tokenizer)
    eos = tokenizer.eos_token_id
    pad_id = models.pad_id(tokenizer, eos)
    device = next(model.parameters()).device
    longest = len(batch[0][0])
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ids, _) in enumerate(batch):  # left padding: generation continues every row
        input_ids[b, longest - len(ids) :] = torch.from_numpy(ids)
        attention_mask[b, longest - len(ids) :] = 1

    def on_bad(row: int, step: int) -> None:
        raise nonfinite_error(cfg, batch[row][1], step, "response token")

    torch.manual_seed(cfg.cache.seed * 1_000_003 + index)
    with _own_generation_defaults(model):
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=_generation_config(cfg, eos, pad_id),
            logits_processor=_vocab_guard(vocab_size, longest, eos, on_bad),
        )
    generated = out.sequences[:, longest:].cpu()  # (B, G)
    step_logits = torch.stack(out.logits, dim=1)  # (B, G, V') raw, untempered
    arrays: dict[str, list] = {"input_ids": [], "n_prompt": [], "source_index": []}
    rows: dict[str, list] = {}
    generator = row_generator(cfg, step_logits.device, index)
    for b, (ids, source) in enumerate(batch):
        tokens = generated[b].tolist()
        n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        arrays["input_ids"].append(np.concatenate([ids, np.asarray(tokens[:n])]))
        arrays["n_prompt"].append(len(ids))
        arrays["source_index"].append(source)
        if cfg.cache.generator != "target":
            continue  # another model's responses: the target scores them in the target stage
        try:
            made = logits_to_rows(cfg, vocab_size, step_logits[b, :n], generator)
        except sparse.NonFiniteRow as err:
            raise nonfinite_error(cfg, source, err.row, "response token") from None
        for name, values in made.items():
            rows.setdefault(name, []).append(values)
    return {
        "lengths": np.array([len(x) for x in arrays["input_ids"]]),
        "input_ids": np.concatenate(arrays["input_ids"]),
        "n_prompt": np.array(arrays["n_prompt"]),
        "source_index": np.array(arrays["source_index"]),
        **{f"row_{name}": np.concatenate(v) for name, v in rows.items()},
    }


@torch.no_grad()
def generate_batches(cfg: Config, model, tokenizer, state: PartialState, progress: bool,
                     identity: dict, sequence_params: dict) -> None:
    """Sample `model`'s responses for the split's prompts and stage them (resumable).

    `model` is the target, or with `--generator draft|ref` that model (on-policy data: the
    target then scores its responses once, in the target stage). `identity` is the model's
    `models.model_identity`; with the settings and the split's `sequence_params` it keys the
    staging folder (see `_prepare_staging`).
    """
    staging = staging_dir(cfg)
    dtype = next(model.parameters()).dtype
    params = _staging_params(cfg, identity, tokenizer, dtype, sequence_params)
    processes.on_main(state, lambda: _prepare_staging(cfg, staging, params))
    state.wait_for_everyone()
    batches = _prompt_batches(cfg, tokenizer)
    mine = [i for i in range(len(batches)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not (staging / f"batch-{i:06d}.npz").exists()]
    bar = tqdm(total=len(todo), desc=f"generate {cfg.data.task}/{cfg.data.split}", unit="batch",
               disable=not progress, dynamic_ncols=True)
    for i in todo:
        payload = _generate_batch(cfg, model, tokenizer, batches[i], i)
        tmp = staging / f"batch-{i:06d}.tmp.npz"
        np.savez(tmp, **payload)
        os.replace(tmp, staging / f"batch-{i:06d}.npz")  # atomic: a staged batch is whole
        bar.update(1)
    bar.close()


def load_generated(cfg: Config) -> dict[int, dict[str, np.ndarray]]:
    """Staged generations by source index: input_ids, label_mask and the sparse rows."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for path in sorted(staging_dir(cfg).glob("batch-*[0-9].npz")):
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


def generated_examples(generated: dict) -> list[tasks.TokenizedExample]:
    """Staged generations as tokenized examples: prompt + response, labels on the response."""
    return [
        tasks.TokenizedExample(
            g["input_ids"].tolist(),
            np.where(g["label_mask"], g["input_ids"], -100).tolist(),
            source,
        )
        for source, g in sorted(generated.items())
    ]


def check_generated(cfg: Config, generated: dict, seqs: list[np.ndarray], source_index) -> None:
    """The staged generations must be the ones the stored sequences were made from."""
    for s, source in enumerate(source_index.tolist()):
        staged = generated.get(source)
        if staged is None or not np.array_equal(staged["input_ids"], seqs[s]):
            raise CacheError(
                f"the staged generations in {staging_dir(cfg)} do not hold the cache's sequence "
                f"{s} (source index {source}); its target rows cannot be rebuilt from them: build "
                "into a new --cache directory"
            )


# ---------------------------------------------------------------------------------------------
# Conversations (task chat): every assistant turn rewritten, turn by turn


def _conversation_batches(cfg: Config) -> list[list[tasks.Example]]:
    """The split's conversations in source order, in batches of --batch-tokens / --max-length
    conversations (a fixed plan: batch i's seed and members never change)."""
    examples = tasks.load_split(cfg.data)
    per_batch = max(1, cfg.cache.batch_tokens // cfg.data.max_length)
    return [examples[i : i + per_batch] for i in range(0, len(examples), per_batch)]


def _generate_replies(cfg: Config, model, tokenizer, prompts: list[list[int]],
                      sources: list[int], seed: int, stops: list[int]) -> list[list[int]]:
    """One sampled (or greedy) reply per prompt, cut before its first stop token."""
    vocab_size = models.real_vocab_size(tokenizer)
    pad_id = models.pad_id(tokenizer, stops[0])
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(prompts):  # left padding: generation continues every row
        input_ids[b, longest - len(ids) :] = torch.tensor(ids)
        attention_mask[b, longest - len(ids) :] = 1

    def on_bad(row: int, step: int) -> None:
        raise nonfinite_error(cfg, sources[row], step, "response token")

    config = _generation_config(cfg, stops, pad_id)
    config.output_logits = False  # the target scores the finished conversations itself
    torch.manual_seed(seed)
    with _own_generation_defaults(model):
        out = model.generate(input_ids=input_ids.to(device),
                             attention_mask=attention_mask.to(device), generation_config=config,
                             logits_processor=_vocab_guard(vocab_size, longest, stops[0], on_bad))
    replies = []
    for tokens in out.sequences[:, longest:].cpu().tolist():
        ends = [i for i, token in enumerate(tokens) if token in stops]
        replies.append(tokens[: ends[0]] if ends else tokens)
    return replies


def _regenerate_batch(cfg: Config, model, tokenizer, batch: list[tasks.Example], index: int,
                      stops: list[int]) -> list[dict]:
    """Rewrite every assistant turn of a batch's conversations, turn by turn: turn t of each
    conversation is generated from its turns before t as regenerated so far. A conversation
    stops at the first turn whose context fills --max-length or whose reply is empty (the turns
    from there on are dropped). Returns one staged record per conversation."""
    turns = [list(ex.conversation.turns) for ex in batch]
    positions = [[i for i, turn in enumerate(t) if turn.role == "assistant"] for t in turns]
    kept = [0] * len(batch)  # assistant turns regenerated so far
    going = [True] * len(batch)
    for t in range(max(len(p) for p in positions)):
        rows, prompts = [], []
        for b, ex in enumerate(batch):
            if not going[b] or t >= len(positions[b]):
                continue
            conversation = dataclasses.replace(ex.conversation, turns=tuple(turns[b]))
            ids = tasks.chat.generation_prompt_ids(conversation, positions[b][t], tokenizer)
            if len(ids) >= cfg.data.max_length:
                going[b] = False
                continue
            rows.append(b)
            prompts.append(ids)
        if not rows:
            break
        seed = (cfg.cache.seed * 1_000_003 + index) * 1_009 + t
        replies = _generate_replies(cfg, model, tokenizer, prompts,
                                    [batch[b].source_index for b in rows], seed, stops)
        for b, prompt, reply in zip(rows, prompts, replies, strict=True):
            text = tokenizer.decode(reply, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            if not text.strip():
                going[b] = False
                continue
            turns[b][positions[b][t]] = tasks.Turn("assistant", text)
            kept[b] += 1
            if len(prompt) + len(reply) + 1 >= cfg.data.max_length:
                going[b] = False  # the next turn could not fit
    records = []
    for b, ex in enumerate(batch):
        cut = positions[b][kept[b] - 1] + 1 if kept[b] else 0
        records.append({"source_index": ex.source_index,
                        "turns": [[turn.role, turn.content] for turn in turns[b][:cut]],
                        "cut": kept[b] < len(positions[b])})
    return records


@torch.no_grad()
def regenerate_conversations(cfg: Config, model, tokenizer, state: PartialState, progress: bool,
                             identity: dict, sequence_params: dict) -> None:
    """Rewrite the split's conversations with `model` and stage them, a batch of conversations
    per file (`batch-NNNNNN.json`, written atomically): resumable, and split across processes
    like `generate_batches`."""
    staging = staging_dir(cfg)
    dtype = next(model.parameters()).dtype
    params = _staging_params(cfg, identity, tokenizer, dtype, sequence_params)
    processes.on_main(state, lambda: _prepare_staging(cfg, staging, params))
    state.wait_for_everyone()
    batches = _conversation_batches(cfg)
    stops = tasks.chat.stop_ids(tokenizer)
    mine = [i for i in range(len(batches)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not (staging / f"batch-{i:06d}.json").exists()]
    bar = tqdm(total=len(todo), desc=f"regenerate {cfg.data.task}/{cfg.data.split}",
               unit="batch", disable=not progress, dynamic_ncols=True)
    for i in todo:
        records = _regenerate_batch(cfg, model, tokenizer, batches[i], i, stops)
        tmp = staging / f"batch-{i:06d}.json.tmp"
        tmp.write_text(json.dumps(records, ensure_ascii=False))
        os.replace(tmp, staging / f"batch-{i:06d}.json")  # atomic: a staged batch is whole
        bar.update(1)
    bar.close()


def regenerated_split(cfg: Config, tokenizer, notes) -> list[tasks.TokenizedExample]:
    """The split's conversations with their staged regenerated turns, tokenized as a cache
    stores them; `notes` (a Counter) counts conversations cut short while regenerating
    ('regenerated_cut') or left with no assistant turn ('regenerated_empty'), and how
    tokenization cut them."""
    staged: dict[int, dict] = {}
    for path in sorted(staging_dir(cfg).glob("batch-*[0-9].json")):
        for record in json.loads(path.read_text()):
            staged[record["source_index"]] = record
    examples = []
    for ex in tasks.load_split(cfg.data):
        record = staged.get(ex.source_index)
        if record is None:
            raise CacheError(f"the staged conversations in {staging_dir(cfg)} lack source "
                             f"index {ex.source_index}; rerun the build to finish them")
        if not record["turns"]:
            notes["regenerated_empty"] += 1
            continue
        notes["regenerated_cut"] += int(record["cut"])
        turns = tuple(tasks.Turn(role, content) for role, content in record["turns"])
        conversation = dataclasses.replace(ex.conversation, turns=turns)
        examples.append(dataclasses.replace(ex, response=turns[-1].content,
                                            conversation=conversation))
    if not examples:
        raise UserError(f"no conversation of {cfg.data.task}/{cfg.data.split} kept an assistant "
                        "turn when regenerated (each context filled --max-length or the first "
                        "reply was empty); raise --max-length")
    return tasks.tokenize_examples(examples, tokenizer, cfg.data.max_length, False, notes)
