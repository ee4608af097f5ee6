"""Run settings as dataclasses: YAML files in `configs/`, overridden by CLI flags.

A config file has one mapping per section (`models`, `data`, `cache`, `train`); every key must be
a field below, and every value is checked here, so a typo or an out-of-range value is a one-line
error that names the key and its flag instead of a failure deep inside a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaspec.errors import UserError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key} (--{key.split('.')[-1].replace('_', '-')}) {message}")


@dataclass
class ModelsConfig:
    target: str = "smollm2-135m"
    """Target model: hub id, local folder, .gguf file, alias `smollm2-135m`, or SPEC@layers=N."""
    draft: str = "smollm2-135m@layers=2"
    """Draft initialisation (the reference starts from the same weights)."""
    ref: str | None = None
    """Trained reference draft; default: the one the ref stage recorded in the cache."""
    dtype: str = "auto"
    """Frozen models' dtype (target, reference, evaluation): auto (bf16 on CUDA, fp32 on CPU),
    float32, bfloat16, float16. Trained weights stay float32 (see train.mixed_precision)."""
    device_map: str | None = None
    """Passed to from_pretrained for the target (`auto` offloads a big target to CPU/disk)."""

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "models.dtype",
            f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )


@dataclass
class DataConfig:
    task: str = "gsm8k"
    """Task name: gsm8k, alpaca, mbpp, cnn_dailymail, xsum, arith (offline, generated)."""
    split: str = "train"
    """Split: train, validation, test or all."""
    data_files: str | None = None
    """Local data file (JSONL, JSON list or CSV) instead of the hub."""
    limit: int | None = None
    """Use only the first N examples of the split."""
    max_length: int = 512
    """Tokens per sequence (prompt + response), truncated beyond."""
    chat_template: bool = False
    """Format prompts with the tokenizer's chat template (instruct models)."""
    seed: int = 0
    """Seed for splits of local files and generated tasks."""

    def __post_init__(self) -> None:
        from adaspec.tasks import TASK_NAMES

        _check(
            self.task in TASK_NAMES,
            "data.task",
            f"must be one of {', '.join(TASK_NAMES)}, got {self.task!r}",
        )
        _check(
            self.split in ("train", "validation", "test", "all"),
            "data.split",
            f"must be train, validation, test or all, got {self.split!r}",
        )
        _check(
            self.limit is None or self.limit >= 1, "data.limit", f"must be >= 1, got {self.limit}"
        )
        _check(
            8 <= self.max_length <= 1 << 20,
            "data.max_length",
            f"must be in [8, 1048576], got {self.max_length}",
        )


@dataclass
class CacheConfig:
    cache: str = "./cache"
    """Cache root: a local folder or an fsspec URL that zarr supports."""
    # Defaults chosen by bench/fidelity.py (docs/fidelity.md): the smallest tested cache whose
    # drafts stay within 0.5 pt of dense-loss drafts in held-out acceptance.
    topk: int = 8
    """Entries per label token (K): the number of draws (sample), or top-K ids (topk)."""
    sparse: str = "sample"
    """sample (K draws from the target; Anshumann et al. 2025) or topk (top-K + tail bucket)."""
    value_encoding: str = "uint8q"
    """Stored log-prob values: uint8q (1/16-nat steps), or float16."""
    id_encoding: str = "delta"
    """Stored token ids: plain, or delta (sorted within a token, differences stored)."""
    batch_tokens: int = 4096
    """Padded tokens per forward batch during the build."""
    shard_rows: int = 16384
    """Label rows per shard: the unit of writing, resuming and splitting across processes."""
    chunk_rows: int = 1024
    """Label rows per compressed chunk inside a shard (the unit of reading)."""
    generate: bool = False
    """Cache the target on its own sampled responses (DistillSpec's best data)."""
    gen_max_new_tokens: int = 256
    """Longest sampled response with --generate."""
    gen_temperature: float = 1.0
    """Sampling temperature of --generate (0 = greedy); the untempered distribution is cached."""
    ref_name: str = "ref"
    """Name under which a reference's per-token losses are stored."""
    seed: int = 0
    """Seed of the sampled mode's draws (the build is deterministic given it)."""

    def __post_init__(self) -> None:
        _check(self.topk >= 1, "cache.topk", f"must be >= 1, got {self.topk}")
        _check(
            self.sparse in ("topk", "sample"),
            "cache.sparse",
            f"must be topk or sample, got {self.sparse!r}",
        )
        _check(
            self.value_encoding in ("float16", "uint8q"),
            "cache.value_encoding",
            f"must be float16 or uint8q, got {self.value_encoding!r}",
        )
        _check(
            self.id_encoding in ("plain", "delta"),
            "cache.id_encoding",
            f"must be plain or delta, got {self.id_encoding!r}",
        )
        _check(
            self.batch_tokens >= 8, "cache.batch_tokens", f"must be >= 8, got {self.batch_tokens}"
        )
        _check(self.chunk_rows >= 1, "cache.chunk_rows", f"must be >= 1, got {self.chunk_rows}")
        _check(
            self.shard_rows >= self.chunk_rows and self.shard_rows % self.chunk_rows == 0,
            "cache.shard_rows",
            f"must be a multiple of chunk_rows={self.chunk_rows}, got {self.shard_rows}",
        )
        _check(
            self.gen_max_new_tokens >= 1,
            "cache.gen_max_new_tokens",
            f"must be >= 1, got {self.gen_max_new_tokens}",
        )
        _check(
            self.gen_temperature >= 0,
            "cache.gen_temperature",
            f"must be >= 0, got {self.gen_temperature}",
        )
        _check(
            self.ref_name.replace("-", "").replace("_", "").isalnum(),
            "cache.ref_name",
            f"must be letters, digits, - or _, got {self.ref_name!r}",
        )


@dataclass
class TrainConfig:
    stage: str = "draft"
    """draft (AdaSPEC; k=1 is DistillSpec), ref (plain-KD reference, k=1), sft (tune the target)."""
    k: float = 0.4
    """Fraction of label tokens AdaSPEC keeps (1.0 = plain KD, the DistillSpec baseline)."""
    loss: str = "fkl"
    """Divergence: fkl, rkl, tvd, jsd."""
    beta: float = 0.5
    """JSD mixture weight of the target (TRL GKD convention)."""
    selection: str = "adaspec"
    """Token rule: adaspec (top-k of L_draft - L_ref) or speckd (draft argmax == target top-1)."""
    threshold: str = "batch"
    """AdaSPEC threshold: batch (quantile in the micro-batch, official) or global (running)."""
    normalize: str = "all"
    """Loss normaliser: all label tokens (official code) or selected tokens (paper Eq. 10)."""
    epochs: float = 1.0
    """Passes over the data."""
    scale_epochs_by_k: bool = False
    """Multiply epochs by 1/k as the official scripts do (3 -> 7.5 at k = 0.4)."""
    batch_size: int = 4
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (the paper: 1e-5, constant)."""
    lr_schedule: str = "constant"
    """constant or cosine (with warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    mixed_precision: str = "auto"
    """Autocast of the trained model: auto (bf16 on CUDA; on CPU bf16 if --dtype is bfloat16),
    no, bf16, fp16. Its weights and optimizer state stay float32 whatever this says."""
    chunk_tokens: int = 1024
    """Label tokens per loss chunk: bounds the (tokens, vocab) memory of the draft's log-softmax."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end of each epoch)."""
    seed: int = 0
    """Seed of data order and initialisation; CPU runs are deterministic given it."""
    out: str | None = None
    """Run folder (default runs/<stage>-<task>-k<k>-<loss>-s<seed>)."""
    online: bool = False
    """Compute target (and reference) outputs live instead of reading the cache (baseline)."""

    def __post_init__(self) -> None:
        _check(
            self.stage in ("draft", "ref", "sft"),
            "train.stage",
            f"must be draft, ref or sft, got {self.stage!r}",
        )
        _check(0.0 < self.k <= 1.0, "train.k", f"must be in (0, 1], got {self.k}")
        _check(
            self.loss in ("fkl", "rkl", "tvd", "jsd"),
            "train.loss",
            f"must be fkl, rkl, tvd or jsd, got {self.loss!r}",
        )
        _check(0.0 <= self.beta <= 1.0, "train.beta", f"must be in [0, 1], got {self.beta}")
        _check(
            self.selection in ("adaspec", "speckd"),
            "train.selection",
            f"must be adaspec or speckd, got {self.selection!r}",
        )
        _check(
            self.threshold in ("batch", "global"),
            "train.threshold",
            f"must be batch or global, got {self.threshold!r}",
        )
        _check(
            self.normalize in ("all", "selected"),
            "train.normalize",
            f"must be all or selected, got {self.normalize!r}",
        )
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(
            self.lr_schedule in ("constant", "cosine"),
            "train.lr_schedule",
            f"must be constant or cosine, got {self.lr_schedule!r}",
        )
        _check(
            self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        )
        _check(
            self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}"
        )
        _check(
            self.max_grad_norm >= 0,
            "train.max_grad_norm",
            f"must be >= 0, got {self.max_grad_norm}",
        )
        _check(
            self.mixed_precision in ("auto", "no", "bf16", "fp16"),
            "train.mixed_precision",
            f"must be auto, no, bf16 or fp16, got {self.mixed_precision!r}",
        )
        _check(
            self.chunk_tokens >= 1, "train.chunk_tokens", f"must be >= 1, got {self.chunk_tokens}"
        )
        _check(
            self.checkpoint_every >= 0,
            "train.checkpoint_every",
            f"must be >= 0, got {self.checkpoint_every}",
        )


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)
    """`section.key` names that the config file or a flag set; every other field is a default.
    Lets a run tell "the user asked for this value" from "nobody said" (e.g. data flags that
    must agree with a cache). Not saved: `to_dict` holds the sections only."""

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {
    f.name: f.type for f in dataclasses.fields(Config) if f.name != "explicit"  # type: ignore[misc]
}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}") from None


def build_config(
    file_values: dict | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Config from a nested mapping (YAML) and flat `section.field` overrides (CLI flags)."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, values in (file_values or {}).items():
        if section not in SECTIONS:
            raise UserError(f"unknown config section {section!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping")
        merged[section].update(values)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        merged[section][name] = value
    types_by_section = _section_types()
    built: dict[str, Any] = {}
    explicit = set()
    for section, cls in types_by_section.items():
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in merged[section].items():
            if name not in known:
                raise UserError(
                    f"unknown config key {section}.{name!r}; known: {', '.join(sorted(known))}"
                )
            kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
            explicit.add(f"{section}.{name}")
        built[section] = cls(**kwargs)
    return Config(**built, explicit=frozenset(explicit))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (if given) and apply CLI overrides (`None` values are ignored)."""
    file_values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(
                f"config file {path} is not valid YAML: {str(err).splitlines()[0]}"
            ) from None
        if not isinstance(file_values, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
    return build_config(file_values, clean)
