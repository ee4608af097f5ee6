"""Export a trained draft as one GGUF file that llama.cpp loads as a draft model (`-md`).

llama.cpp pairs a draft with its target only if their vocabularies agree
(`common_speculative_are_compatible` in its common/speculative.cpp): same vocabulary type, same
add-BOS/add-EOS settings and ids, sizes within 128, and identical token text for every id from 5
up. It has no token map for plain drafts, so the draft's head must score the target's whole
vocabulary. `export_gguf` therefore starts from the draft `adaspec.export.prepare_draft` makes
for every engine (the target's tokenizer checked, a reduced head replaced by the full head whose
unmapped rows are the mean of the mapped ones, rows padded to the target's) and writes it with
the `gguf` package's writer:

- tensors under the names the package's own map gives for the llama architecture
  (`gguf.get_tensor_name_map`), q and k weights permuted as llama.cpp's convert_hf_to_gguf.py
  does (`LlamaModel.permute`: llama.cpp applies RoPE to adjacent pairs, transformers to the two
  halves of a head; transformers' GGUF loader undoes it); a tied head is stored once, as
  `token_embd` (llama.cpp reuses it when `output` is absent);
- hyperparameters under the `llama.*` keys convert_hf_to_gguf.py writes;
- the target's tokenizer metadata: every `tokenizer.*` key copied byte for byte from the target's
  GGUF when the target is one, else built from its Hugging Face tokenizer (byte-level BPE only,
  as convert_hf_to_gguf.py builds a "gpt2" vocabulary; ids past the tokenizer are `[PAD<i>]`,
  UNUSED). Built that way the pre-tokenizer is recorded as "default": llama.cpp's converter
  identifies it by hashing a test string's ids against a table that the `gguf` package does not
  ship. A draft never tokenizes (the target does and hands it ids), so drafting is unaffected;
  convert the target with llama.cpp's converter and pass its GGUF for an exact copy;
- 2-D weights in the chosen type (`gguf.quants`: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0;
  a matrix whose rows do not split into the type's blocks falls back to f16, as in
  convert_hf_to_gguf.py), norms in f32.

The written file is then read back: its token texts, types and special ids must be the target's,
its head must have as many rows as tokens, and transformers loads it (`gguf_file=`), checked
against the model that was written (same greedy tokens at f32; no padded row winning at any type).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaspec.errors import UserError
from adaspec.export import EXPORT_MARKER, prepare_draft, publish, tied_embeddings
from adaspec.export_inputs import TargetInfo
from adaspec.model_card import DEFAULT_GAMMA, ExportResult, GGUFExport, model_card

GGUF_FILE = "draft.gguf"
GGUF_ARCH = "llama"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
TOKENIZER_PREFIX = "tokenizer."


def _quant_types(name: str):
    """(tensor type of 2-D weights, file type) for a --gguf-type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16),
            "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
            "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
            "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}[name]


# ---------------------------------------------------------------------------------------------
# Tokenizer metadata


@dataclass(frozen=True)
class MetaValue:
    """One GGUF key's value as the writer takes it (strings as raw bytes)."""

    value: object
    type: object
    """gguf.GGUFValueType of the value (ARRAY for lists)."""
    sub_type: object | None = None
    """gguf.GGUFValueType of a list's items."""


def _field_value(field) -> MetaValue:
    """A GGUFReader field as written: strings kept as bytes, so nothing is re-encoded."""
    from gguf import GGUFValueType as V

    main = field.types[0]
    if main == V.ARRAY:
        sub = field.types[-1]
        if sub == V.STRING:
            return MetaValue([bytes(field.parts[i]) for i in field.data], main, sub)
        if sub == V.ARRAY:
            raise UserError(f"the target's GGUF key {field.name} is a nested array, which this "
                            "export does not copy")
        return MetaValue([field.parts[i][0].item() for i in field.data], main, sub)
    if main == V.STRING:
        return MetaValue(bytes(field.parts[field.data[0]]), main)
    return MetaValue(field.parts[field.data[0]][0].item(), main)


def gguf_tokenizer_metadata(path: Path) -> dict[str, MetaValue]:
    """Every `tokenizer.*` key of a GGUF file, as stored."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: _field_value(field) for name, field in reader.fields.items()
            if name.startswith(TOKENIZER_PREFIX)}


def _byte_level_bpe(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return (spec.get("model", {}).get("type") == "BPE"
            and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")))


def hf_tokenizer_metadata(tokenizer, rows: int) -> dict[str, MetaValue]:
    """The `tokenizer.*` keys convert_hf_to_gguf.py writes for a byte-level BPE ("gpt2")
    tokenizer of `rows` ids (its `get_vocab_base` and `gguf.SpecialVocab`), pre-tokenizer
    "default" (module docstring)."""
    from gguf import GGUFValueType as V
    from gguf import SpecialVocab, TokenType

    if not _byte_level_bpe(tokenizer):
        raise UserError("the GGUF export builds llama.cpp tokenizer metadata only from a "
                        "byte-level BPE tokenizer; convert the target with llama.cpp's "
                        "convert_hf_to_gguf.py and pass that .gguf as --target")
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(reverse) >= rows:
        raise UserError(f"the target's tokenizer has id {max(reverse)} but its model only "
                        f"{rows} vocabulary rows")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:  # llama.cpp takes added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    meta = {"tokenizer.ggml.model": MetaValue(b"gpt2", V.STRING),
            "tokenizer.ggml.pre": MetaValue(b"default", V.STRING),
            "tokenizer.ggml.tokens": MetaValue([t.encode() for t in tokens], V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": MetaValue([int(t) for t in types], V.ARRAY, V.INT32)}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = SpecialVocab(folder, load_merges=True, n_vocab=rows)
    if special.merges:
        meta["tokenizer.ggml.merges"] = MetaValue([m.encode() for m in special.merges],
                                                  V.ARRAY, V.STRING)
    for kind, token_id in special.special_token_ids.items():
        key = {"unk": "unknown", "pad": "padding", "sep": "seperator"}.get(kind, kind)
        meta[f"tokenizer.ggml.{key}_token_id"] = MetaValue(int(token_id), V.UINT32)
    for kind, value in special.add_special_token.items():
        meta[f"tokenizer.ggml.add_{kind}_token"] = MetaValue(bool(value), V.BOOL)
    if isinstance(special.chat_template, str):
        meta["tokenizer.chat_template"] = MetaValue(special.chat_template.encode(), V.STRING)
    return meta


def target_tokenizer_metadata(target: TargetInfo, rows: int) -> tuple[dict[str, MetaValue], str]:
    """(the `tokenizer.*` keys the draft gets, where they came from)."""
    if target.gguf_file:
        path = Path(target.location) / target.gguf_file
        meta = gguf_tokenizer_metadata(path)
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise UserError(f"the target's GGUF {path} has no tokenizer.ggml.tokens")
        if len(tokens.value) != rows:
            raise UserError(f"the target's GGUF {path} lists {len(tokens.value)} tokens but "
                            f"its model has {rows} vocabulary rows")
        return meta, f"copied from the target's GGUF ({target.gguf_file})"
    return (hf_tokenizer_metadata(target.tokenizer, rows),
            "built from the target's Hugging Face tokenizer (byte-level BPE, as llama.cpp's "
            "converter builds it)")


# ---------------------------------------------------------------------------------------------
# Hyperparameters and tensors


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get(
        "rope_type")
    if rope_type not in (None, "default"):
        raise UserError(f"the draft uses RoPE scaling {rope_type!r}, which the GGUF export does "
                        "not write; export it as a Hugging Face folder and convert it with "
                        "llama.cpp's convert_hf_to_gguf.py")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("the draft's config has no rope_theta")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer, config, rows: int, file_type, name: str) -> None:
    """general.* and llama.* keys, as convert_hf_to_gguf.py writes them for LlamaForCausalLM."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(rows)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_rope(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: transformers' rotate-half layout of a q or k
    projection's rows -> llama.cpp's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every weight, named by the gguf package's map for llama;
    a tied head is left out (llama.cpp then uses token_embd)."""
    import gguf

    config = model.config.get_text_config()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = tied_embeddings(model)
    out = []
    for hf_name, param in model.named_parameters():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"the draft's tensor {hf_name} has no name in llama.cpp's llama "
                            "architecture; the GGUF export supports Llama drafts only")
        data = param.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rope(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rope(data, n_head, n_kv)
        out.append((name, np.ascontiguousarray(data)))
    return out


def encode_tensor(name: str, data: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """(bytes or array to write, its tensor type): norms and vectors f32, as llama.cpp wants;
    a matrix whose rows do not split into the type's blocks falls back to f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import QuantError, quants

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = Q.F32
    try:
        return quants.quantize(data, qtype), qtype
    except QuantError:
        return quants.quantize(data, Q.F16), Q.F16


def write_gguf(path: Path, model, rows: int, tokenizer_meta: dict[str, MetaValue],
               gguf_type: str, name: str) -> dict[str, str]:
    """Write the draft to `path`; returns each tensor's GGUF type name."""
    import gguf

    config = model.config.get_text_config()
    if config.model_type != GGUF_ARCH:
        raise UserError(f"the draft is a {config.model_type} model; the GGUF export writes "
                        "Llama drafts only (llama.cpp's llama architecture)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("the draft has attention or MLP biases; the GGUF export writes Llama "
                        "drafts without biases only (transformers' GGUF loader, which checks "
                        "the file, drops llama biases)")
    qtype, file_type = _quant_types(gguf_type)
    writer = gguf.GGUFWriter(path, GGUF_ARCH)
    add_hparams(writer, config, rows, file_type, name)
    for key, meta in tokenizer_meta.items():
        writer.add_key_value(key, meta.value, meta.type, sub_type=meta.sub_type)
    types = {}
    for tensor_name, data in gguf_tensors(model):
        encoded, used = encode_tensor(tensor_name, data, qtype)
        writer.add_tensor(tensor_name, encoded, raw_dtype=used)
        types[tensor_name] = used.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


# ---------------------------------------------------------------------------------------------
# Checks and the export


def check_written(path: Path, tokenizer_meta: dict[str, MetaValue], rows: int) -> None:
    """The file read back: tokenizer keys exactly as meant (llama.cpp's compatibility check
    compares type, BOS/EOS, size and every token's text) and as many head rows as tokens."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    for key, meta in tokenizer_meta.items():
        field = reader.fields.get(key)
        if field is None or _field_value(field) != meta:
            raise RuntimeError(f"export check: {path.name}'s {key} is not the target's")
    for tensor in reader.tensors:
        if tensor.name in ("token_embd.weight", "output.weight") and int(tensor.shape[-1]) != rows:
            raise RuntimeError(f"export check: {tensor.name} has {int(tensor.shape[-1])} rows, "
                               f"the vocabulary {rows}")


def load_gguf_draft(folder: Path, gguf_file: str = GGUF_FILE):
    """The exported draft as transformers loads it (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                dtype=torch.float32).eval()


def verify_gguf(folder: Path, model, real: int, gguf_type: str) -> None:
    """transformers reads the file back (its loader undoes the q/k permutation): at f32 it must
    propose the written model's tokens; at every type no padded row may win."""
    reloaded = load_gguf_draft(folder)
    ids = (torch.arange(48) * 7919 % real).unsqueeze(0)  # a fixed spread of real ids
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits.float()
        after = reloaded(input_ids=ids).logits.float()
    if after.shape[-1] != before.shape[-1]:
        raise RuntimeError(f"export check: the GGUF draft gives {after.shape[-1]} logits per "
                           f"token, the written one {before.shape[-1]}")
    if gguf_type == "f32" and not torch.equal(after[..., :real].argmax(-1),
                                              before[..., :real].argmax(-1)):
        raise RuntimeError("export check: the f32 GGUF draft proposes other tokens than the "
                           "written one")
    if int(after.argmax(-1).max()) >= real:
        raise RuntimeError("export check: a padded vocabulary row wins the argmax")


def llamacpp_command(draft_path: Path, target: TargetInfo, gamma: int) -> str:
    """llama-server with the export as its draft (flags of current llama.cpp)."""
    import shlex

    served = (str(Path(target.location) / target.gguf_file) if target.gguf_file
              else "TARGET.gguf")
    return (f"llama-server -m {shlex.quote(served)} -md {shlex.quote(str(draft_path))} "
            f"--spec-type draft-simple --spec-draft-n-max {gamma} --spec-draft-p-min 0")


def export_gguf(run: str, out: str | Path, target: str | None = None, best: bool = False,
                overwrite: bool = False, eval_json: str | None = None,
                gguf_type: str = "f16") -> ExportResult:
    """Write `out`/draft.gguf (with a model card) for llama.cpp; see the module docstring. The
    folder is written beside `out` and moved in place only once it checks out."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    draft = prepare_draft(run, out, target, best, overwrite, eval_json)
    result, info, model = draft.result, draft.target, draft.model
    out = Path(out).expanduser()
    tokenizer_meta, tokenizer_source = target_tokenizer_metadata(info, result.rows)
    result.architectures = [GGUF_ARCH]
    result.notes = [n for n in result.notes if "architectures" not in n]
    if draft.reduced is not None:
        result.notes.append(
            f"reduced-vocabulary draft: it predicts over {draft.reduced.n_mapped} ids; llama.cpp "
            "has no token map for draft models, so the file holds the full head, the other rows "
            "the mean of the mapped rows (they never win an argmax)")
    gamma = int(draft.evaluation.get("gamma", DEFAULT_GAMMA)) if draft.evaluation \
        else DEFAULT_GAMMA
    result.command = llamacpp_command(result.out / GGUF_FILE, info, gamma)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        types = write_gguf(staging / GGUF_FILE, model, result.rows, tokenizer_meta, gguf_type,
                           name=f"adaspec draft for {info.spec}")
        fallback = sorted(n for n, t in types.items() if t == "F16" and gguf_type != "f16"
                          and not n.endswith("norm.weight"))
        if fallback and gguf_type not in ("f32", "bf16"):
            result.notes.append(f"{len(fallback)} tensors stored as f16: their rows do not split "
                                f"into {gguf_type} blocks")
        check_written(staging / GGUF_FILE, tokenizer_meta, result.rows)
        verify_gguf(staging, model, result.real_vocab, gguf_type)
        gguf_info = GGUFExport(file=GGUF_FILE, type=gguf_type, tokenizer=tokenizer_source,
                               size_bytes=(staging / GGUF_FILE).stat().st_size,
                               tensor_types=types)
        (staging / "README.md").write_text(model_card(
            result, model, info, draft.source, draft.run_config, draft.evaluation,
            gguf=gguf_info))
        (staging / EXPORT_MARKER).write_text(json.dumps(
            {"made_by": "adaspec-export", "format": "gguf", "gguf_type": gguf_type,
             "target": info.spec}, indent=2) + "\n")
        publish(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result


def format_summary(result: ExportResult) -> str:
    """What the CLI prints: the file, its vocabulary, notes, and the llama-server command."""
    lines = [f"exported {result.draft} to {result.out / GGUF_FILE}",
             f"  for target {result.target}: {result.rows} vocabulary rows "
             f"({result.real_vocab} tokenizer ids), llama architecture"]
    lines += [f"  note: {note}" for note in result.notes]
    lines += ["serve it with llama.cpp as the target's draft:", result.command]
    return "\n".join(lines)
