"""Reduced-vocabulary draft heads: the draft predicts over a token map of N ids (`--draft-vocab`).

A small draft keeps the target's whole vocabulary head, and on a CPU that head is most of its
cost (SmolLM2's 49,152 x 576 rows are 28M of a 2-layer draft's 35M parameters). FR-Spec (2025)
and EAGLE-3 give the draft only the ids the target actually uses. Here:

- `token_map` picks the N ids with the most target probability mass over a cached training
  split (summed cached probabilities in topk mode, draw shares in sample mode), plus EOS and the
  tokenizer's special tokens, sorted by id.
- `ReducedHead` replaces the draft's lm_head: N rows (initialised from the draft's own rows of
  those ids) and one "rest" row standing for every other id. Training uses all N + 1 logits
  (`restricted_logits`; `losses.restricted_divergence` coarse-grains the target onto them, so
  AdaSPEC's selection and every divergence keep their meaning). Its `forward`, which is what
  the model's own forward, evaluation and speculative decoding see, gives full-vocabulary
  logits: the N mapped logits in place and -inf elsewhere (the rest dropped), so the draft
  proposes only mapped ids, and verification stays full-vocabulary and lossless.
- On disk (`save` / `restore`) a reduced draft is a plain full-vocabulary save_pretrained folder
  with an untied lm_head (mapped rows as trained; every other row the mean of the mapped rows,
  whose logit is the mean of the mapped logits and never wins an argmax, as `export` pads), plus
  `draft_vocab.json` (the ids and the rest row). Plain transformers and serving engines load
  the folder as it is; adaspec loads it back to the exact reduced head.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from adaspec.errors import UserError
from cache_tools.store import CacheReader

MAP_FILE = "draft_vocab.json"
SGLANG_MAP_FILE = "speculative_token_map.pt"  # SGLang: --speculative-token-map <folder>/this
D2T_FILE = "d2t.json"  # EAGLE-3's draft-to-target offsets
MAP_ROWS = 65536  # label rows read per block when summing the target's mass


def token_map(reader: CacheReader, n: int, always: list[int]) -> np.ndarray:
    """(N,) int64 sorted ids: the `n` ids with the most target mass over the reader's split,
    plus `always` (EOS, special tokens) on top of them, so the map may hold up to n + len(always)
    ids; ties go to the smaller id."""
    vocab = reader.vocab_size
    if not 1 <= n <= vocab:
        raise UserError(f"--draft-vocab {n} must be in 1..{vocab} (the tokenizer's ids)")
    mass = np.zeros(vocab, dtype=np.float64)
    total = reader.n_label_rows
    for start in range(0, total, MAP_ROWS):
        rows = reader.target_rows(start, min(total, start + MAP_ROWS))
        ids = rows["ids"].astype(np.int64)
        if "counts" in rows:
            counts = rows["counts"].astype(np.float64)
            weight = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
        else:
            weight = np.exp(rows["logprobs"].astype(np.float64))
        weight = np.where(np.isfinite(weight), weight, 0.0)
        mass += np.bincount(ids.ravel(), weights=weight.ravel(), minlength=vocab)[:vocab]
    order = np.lexsort((np.arange(vocab), -mass))  # most mass first, then the smaller id
    chosen = set(order[:n].tolist()) | {int(i) for i in always if 0 <= int(i) < vocab}
    return np.array(sorted(chosen), dtype=np.int64)


def special_ids(tokenizer) -> list[int]:
    """EOS and every special token of the tokenizer (chat-template markers included)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            ids.add(int(token_id))
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return sorted(ids)


def map_hash(ids) -> str:
    """16 hex chars identifying a token map (the reference and the draft must share one)."""
    array = np.asarray(ids, dtype=np.int64)
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


class ReducedHead(torch.nn.Module):
    """An lm_head over N mapped ids and a rest outcome (module docstring).

    `weight` is (N + 1, H): the mapped ids' rows in map order, then the rest row. `ids` (N,) are
    the mapped vocabulary ids; `to_draft` (V,) sends each id to its row (N: the rest).
    """

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor, vocab_rows: int):
        super().__init__()
        if weight.shape[0] != ids.shape[0] + 1:
            raise ValueError(f"weight {tuple(weight.shape)} needs N + 1 = {len(ids) + 1} rows")
        self.weight = torch.nn.Parameter(weight)
        self.register_buffer("ids", ids.long())
        to_draft = torch.full((vocab_rows,), len(ids), dtype=torch.long, device=ids.device)
        to_draft[ids.long()] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("to_draft", to_draft)
        self.vocab_rows = vocab_rows

    @property
    def n_mapped(self) -> int:
        return self.ids.shape[0]

    def restricted_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., N + 1) logits: the mapped ids', then the rest's."""
        return torch.nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) full-vocabulary logits: mapped ids in place, -inf everywhere else."""
        mapped = torch.nn.functional.linear(hidden, self.weight[:-1])  # (..., N)
        out = mapped.new_full((*mapped.shape[:-1], self.vocab_rows), -math.inf)
        return out.index_copy_(-1, self.ids, mapped)


def reduced_head_of(model) -> ReducedHead | None:
    head = model.get_output_embeddings()
    return head if isinstance(head, ReducedHead) else None


def reduce_head(model, ids, rest_row: torch.Tensor | None = None):
    """Give `model` a ReducedHead over `ids` (in place; returns the model). Mapped rows are the
    model's own head rows; the rest row is `rest_row`, or the mean of the unmapped rows. The
    input embedding stays whole (every id can still be read) and is untied from the head."""
    if reduced_head_of(model) is not None:
        raise ValueError("the model's head is already reduced")
    head = model.get_output_embeddings()
    weight = head.weight.detach()
    if getattr(head, "bias", None) is not None:
        raise UserError("--draft-vocab needs a bias-free lm_head (Llama/Qwen/GPT-NeoX style)")
    ids = torch.as_tensor(ids, dtype=torch.long, device=weight.device)
    if rest_row is None:
        unmapped = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        unmapped[ids] = False
        rest_row = weight[unmapped].mean(0) if unmapped.any() else weight.mean(0)
    rows = torch.cat([weight[ids], rest_row.to(weight).unsqueeze(0)]).clone()
    _untie(model)
    model.set_output_embeddings(ReducedHead(rows, ids, weight.shape[0]))
    return model


def _untie(model) -> None:
    """Give the input embedding its own weights and say so in the config."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        embed.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", lambda: None)()
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False


def full_head(head: ReducedHead) -> torch.nn.Linear:
    """The plain full-vocabulary lm_head engines load: mapped rows as trained, every other row
    the mean of the mapped rows (its logit is their mean: it never wins an argmax)."""
    mapped = head.weight.detach()[:-1]
    weight = mapped.mean(0, keepdim=True).expand(head.vocab_rows, -1).clone()
    weight[head.ids] = mapped
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                             device=weight.device, dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight)
    return linear


def save(model, save_plain, out_dir: Path) -> None:
    """`save_plain(model)` with the full-vocabulary head in place, then the map beside it."""
    head = reduced_head_of(model)
    model.set_output_embeddings(full_head(head))
    try:
        save_plain(model)
    finally:
        model.set_output_embeddings(head)
    write_map(out_dir, head)


def write_map(folder: Path, head: ReducedHead) -> None:
    """draft_vocab.json: the ids (draft row i predicts id ids[i]) and the rest row."""
    (Path(folder) / MAP_FILE).write_text(json.dumps({
        "format": "adaspec-draft-vocab", "version": 1, "n": head.n_mapped,
        "vocab_rows": head.vocab_rows, "hash": map_hash(head.ids.cpu().numpy()),
        "ids": head.ids.tolist(), "rest_row": head.weight.detach()[-1].float().tolist()}) + "\n")


def write_serving_maps(folder: Path, head: ReducedHead) -> list[str]:
    """The map in the engines' formats beside draft_vocab.json: SGLang's
    `--speculative-token-map` file (a torch.load-able 1-D int64 tensor of the hot ids, draft row
    order) and EAGLE-3's `d2t` offsets (target id = i + d2t[i]). Returns the file names."""
    write_map(folder, head)
    ids = head.ids.detach().cpu().long()
    torch.save(ids.clone(), Path(folder) / SGLANG_MAP_FILE)
    (Path(folder) / D2T_FILE).write_text(json.dumps(
        (ids - torch.arange(len(ids))).tolist()) + "\n")
    return [MAP_FILE, SGLANG_MAP_FILE, D2T_FILE]


def read_map(folder: Path) -> dict | None:
    """The folder's draft_vocab.json, or None for a full-head model."""
    path = Path(folder) / MAP_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        ids, rest = saved["ids"], saved["rest_row"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is damaged ({err}); re-save the model") from None
    return {**saved, "ids": ids, "rest_row": rest}


def restore(model, folder: Path):
    """Re-make the ReducedHead of a model saved by `save` (a full-head model comes back as is)."""
    saved = read_map(folder)
    if saved is None:
        return model
    head = model.get_output_embeddings()
    rest = torch.tensor(saved["rest_row"], dtype=head.weight.dtype, device=head.weight.device)
    if max(saved["ids"], default=0) >= head.weight.shape[0] or \
            rest.shape[0] != head.weight.shape[1]:
        raise UserError(f"{Path(folder) / MAP_FILE} does not match the model's head "
                        f"{tuple(head.weight.shape)}; re-save the model")
    return reduce_head(model, saved["ids"], rest)
