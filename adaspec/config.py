"""Run settings as dataclasses: YAML files in `configs/`, overridden by CLI flags.

This module is the one source of settings. Every field has a docstring (it becomes the flag's
help) and an optional `meta(flag=...)`: the flag name when it is not `--field-name`. A field
with choices declares them in its annotation (`Literal[...]`, the aliases below); the modules
that implement them are tied to those lists by tests, not by imports, so settings never import
what they configure. `cli/common.py` builds each command's flags from these classes.

A config file has one mapping per section (`models`, `data`, `cache`, `train`, `eval`,
`sweep`); every key must be a field below, and every value is checked here, so a typo or an
out-of-range value is a one-line error that names the key and its flag instead of a failure deep
inside a run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from adaspec.config_fields import Checked, check_field, coerce, meta
from adaspec.errors import UserError

# The allowed values of every setting with choices. The implementing modules keep their own
# tuples (losses.DIVERGENCES, selection.RULES, ...); tests/test_config.py ties each to these.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
TaskName = Literal["gsm8k", "alpaca", "mbpp", "cnn_dailymail", "xsum", "arith", "chat"]
Split = Literal["train", "validation", "test", "all"]
SparseMode = Literal["topk", "sample"]
ValueEncoding = Literal["float16", "uint8q"]
IdEncoding = Literal["plain", "delta"]
Generator = Literal["target", "draft", "ref"]
Stage = Literal["draft", "ref", "sft"]
Divergence = Literal["fkl", "rkl", "tvd", "jsd"]
SelectionRule = Literal["adaspec", "speckd"]
Threshold = Literal["batch", "global"]
Normalizer = Literal["all", "selected"]
Schedule = Literal["constant", "cosine"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Tracker = Literal["tensorboard", "wandb", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab",
                  "trackio", "all"]
BestMetric = Literal["expected_acceptance", "greedy_agreement"]
EvalMode = Literal["offline", "exact", "speculative"]

# Keys renamed since earlier configs: old key -> (new key, why).
RENAMED = {
    "cache.topk@sample": ("cache.draws", "the sampled mode's number of draws is cache.draws "
                                         "(--draws); cache.topk (--topk) is the top-K of "
                                         "--sparse topk"),
}


@dataclass
class ModelsConfig(Checked):
    section: ClassVar[str] = "models"

    target: str = field(default="smollm2-135m", metadata=meta("--target"))
    """Target model: hub id, local folder, .gguf file, alias `smollm2-135m`, or SPEC@layers=N."""
    draft: str = field(default="smollm2-135m@layers=2", metadata=meta("--draft"))
    """Draft initialisation (the reference starts from the same weights)."""
    ref: str | None = field(default=None, metadata=meta("--ref"))
    """Trained reference draft; default: the one the ref stage recorded in the cache."""
    dtype: Dtype = "auto"
    """Frozen models' dtype (target, reference, evaluation): auto is bf16 on CUDA, fp32 on CPU.
    Trained weights stay float32 (see train.mixed_precision)."""
    device_map: str | None = None
    """Passed to from_pretrained for the target (`auto` offloads a big target to CPU/disk)."""


@dataclass
class DataConfig(Checked):
    section: ClassVar[str] = "data"

    task: TaskName = "gsm8k"
    """Task name (arith: offline, generated; chat: your own conversations, --data-files)."""
    split: Split = "train"
    """Split of the task's data."""
    data_files: str | None = None
    """Local data file (JSONL, JSON list or CSV) instead of the hub."""
    limit: int | None = None
    """Use only the first N examples of the split."""
    max_length: int = 512
    """Tokens per sequence (prompt + response), truncated beyond."""
    chat_template: bool = False
    """Format prompts with the tokenizer's chat template (instruct models)."""
    seed: int = field(default=0, metadata=meta("--data-seed"))
    """Seed for splits of local files and generated tasks."""

    def check(self) -> None:
        self._range("limit", self.limit is None or self.limit >= 1, "must be >= 1")
        self._range("max_length", 8 <= self.max_length <= 1 << 20, "must be in [8, 1048576]")


@dataclass
class CacheConfig(Checked):
    section: ClassVar[str] = "cache"

    cache: str = field(default="./cache", metadata=meta("--cache"))
    """Cache root: a local folder or an object store URL (s3://bucket/prefix; see README)."""
    local_cache_mb: int = 4096
    """Local disk kept of a remote cache's shard files by what reads it (MB; 0: read the store
    directly); the least recently used shards are dropped past it."""
    local_cache_dir: str | None = None
    """Where those shard files are kept (default ~/.cache/adaspec/shards/<hash of --cache>)."""
    # Defaults chosen by studies/fidelity.py (docs/fidelity.md): the smallest tested cache whose
    # drafts stay within 0.5 pt of dense-loss drafts in held-out acceptance.
    sparse: SparseMode = "sample"
    """sample (K draws from the target; Anshumann et al. 2025) or topk (top-K + tail bucket)."""
    draws: int = 8
    """Tokens drawn from the target per label token (--sparse sample)."""
    topk: int = 64
    """Top-K entries stored per label token (--sparse topk)."""
    value_encoding: ValueEncoding = "uint8q"
    """Stored log-prob values: uint8q (1/16-nat steps), or float16."""
    id_encoding: IdEncoding = "delta"
    """Stored token ids: plain, or delta (sorted within a token, differences stored)."""
    batch_tokens: int = 4096
    """Padded tokens per forward batch during the build (and offline evaluation)."""
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
    generator: Generator = "target"
    """Who writes the responses with --generate: the target, or the draft / the reference
    (on-policy data, scored once by the target)."""
    ref_name: str = "ref"
    """Name under which a reference's per-token losses are stored."""
    seed: int = field(default=0, metadata=meta("--cache-seed"))
    """Seed of the sampled mode's draws (the build is deterministic given it)."""

    @property
    def k(self) -> int:
        """Entries per label token of the configured mode (the manifest's `k`)."""
        return self.draws if self.sparse == "sample" else self.topk

    def check(self) -> None:
        self._range("draws", self.draws >= 1, "must be >= 1")
        self._range("local_cache_mb", self.local_cache_mb >= 0, "must be >= 0")
        self._range("topk", self.topk >= 1, "must be >= 1")
        self._range("batch_tokens", self.batch_tokens >= 8, "must be >= 8")
        self._range("chunk_rows", self.chunk_rows >= 1, "must be >= 1")
        self._range("shard_rows",
                    self.shard_rows >= self.chunk_rows and self.shard_rows % self.chunk_rows == 0,
                    f"must be a multiple of chunk_rows={self.chunk_rows}")
        self._range("gen_max_new_tokens", self.gen_max_new_tokens >= 1, "must be >= 1")
        self._range("gen_temperature", self.gen_temperature >= 0, "must be >= 0")
        check_field(self.ref_name.replace("-", "").replace("_", "").isalnum(), "cache.ref_name",
               CacheConfig, f"must be letters, digits, - or _, got {self.ref_name!r}")


# The official code's learning rates: reference and draft 3e-4, target fine-tune 1e-5.
STAGE_LR = {"ref": 3e-4, "draft": 3e-4, "sft": 1e-5}


@dataclass
class TrainConfig(Checked):
    section: ClassVar[str] = "train"

    stage: Stage = "draft"
    """draft (AdaSPEC; k=1 is DistillSpec), ref (plain-KD reference, k=1), sft (tune the target)."""
    k: float = 0.4
    """Fraction of label tokens AdaSPEC keeps (1.0 = plain KD, the DistillSpec baseline)."""
    loss: Divergence = "fkl"
    """Divergence between target and draft."""
    beta: float = 0.5
    """JSD mixture weight of the target (TRL GKD convention)."""
    selection: SelectionRule = "adaspec"
    """Token rule: adaspec (top-k of L_draft - L_ref) or speckd (draft argmax == target top-1)."""
    threshold: Threshold = "batch"
    """AdaSPEC threshold: batch (quantile in the micro-batch, official) or global (running)."""
    normalize: Normalizer = "all"
    """Loss normaliser: all label tokens (official code) or selected tokens (paper Eq. 10)."""
    epochs: float = 1.0
    """Passes over the data."""
    scale_epochs_by_k: bool = False
    """E/k epochs at the same batch (3 -> 7.5 at k = 0.4): 1/k times the optimizer steps of
    k = 1, not the official schedule (see --official-schedule)."""
    official_schedule: bool = False
    """The official scripts' schedule: E/k epochs at a micro-batch of round(b/k) sequences, so
    a k < 1 draft takes the optimizer steps of k = 1 and keeps as many tokens per step."""
    batch_size: int = 4
    """Sequences per micro-batch (per process); b/k with --official-schedule."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float | None = None
    """Peak learning rate (default: the official code's per stage, 3e-4 for the reference and
    the draft, 1e-5 for the target fine-tune)."""
    lr_schedule: Schedule = "constant"
    """constant or cosine (with warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    mixed_precision: MixedPrecision = "auto"
    """Autocast of the trained model: auto (bf16 on CUDA; on CPU bf16 if --dtype is bfloat16),
    no, bf16, fp16. Its weights and optimizer state stay float32 whatever this says."""
    draft_vocab: int | None = None
    """Reduced-vocabulary head: the draft predicts over the N ids with the most target mass in
    the training split's cache (plus EOS and special tokens) and one rest outcome; decoding
    stays lossless (the target verifies over the full vocabulary)."""
    chunk_tokens: int = 1024
    """Label tokens per loss chunk: bounds the (tokens, vocab) memory of the draft's log-softmax."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end of each epoch)."""
    log_every: int = 1
    """Write metrics (and sync them from the device) every N optimizer steps."""
    stream_memory_mb: float = 2048.0
    """Memory the batch stream may hold for cached rows and tokens: the whole split when it
    fits, else windows of blocks with a windowed shuffle (see adaspec/stream.py)."""
    compile: bool = False
    """torch.compile the trained model's trunk (opt-in; pays off on GPUs for long runs)."""
    seed: int = field(default=0, metadata=meta("--seed"))
    """Seed of data order and initialisation; CPU runs are deterministic given it."""
    out: str | None = field(default=None, metadata=meta("--out"))
    """Run folder (default runs/<stage>-<task>-k<k>-<loss>-s<seed>)."""
    online: bool = False
    """Compute target (and reference) outputs live instead of reading the cache (baseline)."""
    report_to: Tracker | None = None
    """Also log to experiment trackers through accelerate (tensorboard writes <run>/logs/):
    loss, selected fraction, lr, tokens/s, validation acceptance; the config as
    hyperparameters. metrics.jsonl is written either way."""
    eval_split: Split | None = None
    """A cached split of the task to measure the draft on, offline, at each epoch end (the
    paper's model selection without the target)."""
    eval_every: int = 0
    """Also measure on --eval-split every N optimizer steps (0: at epoch ends only)."""
    eval_cache: str | None = None
    """Cache holding --eval-split (default: --cache), e.g. one of the target's own greedy
    continuations of the validation prompts (built with --generate --gen-temperature 0): what
    speculative decoding sees."""
    keep_best: bool = False
    """Keep best/: the model of the evaluation with the highest --best-metric."""
    best_metric: BestMetric = "expected_acceptance"
    """What --keep-best maximises: expected_acceptance (sum min(p, q), offline bounds' middle)
    or greedy_agreement (draft argmax == target argmax: what greedy decoding accepts)."""

    @property
    def learning_rate(self) -> float:
        """--lr, or the official per-stage default when it is not given."""
        return self.lr if self.lr is not None else STAGE_LR[self.stage]

    @property
    def run_epochs(self) -> float:
        """Passes over the data the run makes: E, or E/k under either k schedule."""
        scaled = self.scale_epochs_by_k or self.official_schedule
        return self.epochs / self.k if scaled else self.epochs

    @property
    def run_batch_size(self) -> int:
        """Sequences per micro-batch the run uses: b, or round(b/k) on the official schedule."""
        return max(1, round(self.batch_size / self.k)) if self.official_schedule \
            else self.batch_size

    @property
    def needs_ref(self) -> bool:
        """AdaSPEC with k < 1 compares the draft with a reference."""
        return self.stage == "draft" and self.k < 1.0 and self.selection == "adaspec"

    def micro_batches(self, per_epoch: int) -> int:
        """Micro-batches per process the run makes over a stream of `per_epoch` per epoch."""
        return max(1, round(self.run_epochs * per_epoch))

    def optimizer_steps(self, per_epoch: int) -> int:
        """Optimizer steps of the run: its micro-batches, `grad_accum` to a step (rounded up)."""
        return -(-self.micro_batches(per_epoch) // self.grad_accum)

    def check(self) -> None:
        self._range("k", 0.0 < self.k <= 1.0, "must be in (0, 1]")
        self._range("eval_every", self.eval_every >= 0, "must be >= 0")
        self._range("draft_vocab", self.draft_vocab is None or self.draft_vocab >= 1,
                    "must be >= 1")
        check_field(self.draft_vocab is None or self.stage != "sft", "train.draft_vocab",
               TrainConfig, "is for drafts and references, not --stage sft (the target)")
        check_field(not (self.official_schedule and self.scale_epochs_by_k),
               "train.official_schedule", TrainConfig,
               "and --scale-epochs-by-k are two schedules; give one")
        check_field(self.eval_cache is None or self.eval_split is not None, "train.eval_cache",
               TrainConfig, "needs --eval-split (the split to read from it)")
        check_field(not self.keep_best or self.eval_split is not None, "train.keep_best",
               TrainConfig, "needs --eval-split (the split the best model is chosen on)")
        self._range("beta", 0.0 <= self.beta <= 1.0, "must be in [0, 1]")
        self._range("epochs", self.epochs > 0, "must be > 0")
        for name in ("batch_size", "grad_accum", "chunk_tokens", "log_every"):
            self._range(name, getattr(self, name) >= 1, "must be >= 1")
        self._range("lr", self.lr is None or self.lr > 0, "must be > 0")
        self._range("stream_memory_mb", self.stream_memory_mb > 0, "must be > 0")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "checkpoint_every"):
            self._range(name, getattr(self, name) >= 0, "must be >= 0")


@dataclass
class EvalConfig(Checked):
    section: ClassVar[str] = "eval"

    modes: tuple[EvalMode, ...] | None = None
    """Comma list of offline, exact, speculative (default: all, offline if the split is cached)."""
    gamma: int | str = 5
    """Draft tokens per speculative step, or auto: each draft's fastest gamma up to
    --max-gamma, predicted from this machine's measured step costs and a pilot run's
    per-position acceptance (adaspec/speedup.py)."""
    max_gamma: int = 8
    """Largest gamma --gamma auto considers."""
    temperature: float = 0.0
    """Sampling temperature of speculative decoding (0 = greedy)."""
    max_new_tokens: int = 128
    """Tokens generated per prompt in speculative decoding."""
    prompts: int = 10
    """Prompts of the split decoded speculatively."""
    speed_rounds: int = 3
    """Interleaved timing rounds of speculative and target-only decoding (speeds are medians)."""
    speed: bool = True
    """Time speculative against target-only decoding (off: acceptance counts only, one pass)."""
    prepack: bool = True
    """On a CPU in fp32, decode (speculative and target-only alike) with every linear layer's
    weight prepacked for oneDNN: verifying several tokens costs less (adaspec/cpu_decoding.py).
    Teacher-forced measures never use it."""
    compare: bool = False
    """Print the first draft minus each other draft, with standard errors (paired: the same
    tokens, clustered by sequence; the same prompts for decoding)."""
    continuations_cache: str | None = None
    """A cache whose split holds the target's own greedy continuations of the prompts (built
    with --generate --gen-temperature 0): acceptance measured on what speculative decoding
    sees, offline and exact."""

    def check(self) -> None:
        self._range("gamma", self.gamma == "auto" or (isinstance(self.gamma, int)
                                                     and self.gamma >= 1), "must be >= 1 or auto")
        self._range("max_gamma", 1 <= self.max_gamma <= 64, "must be in [1, 64]")
        self._range("temperature", self.temperature >= 0, "must be >= 0")
        self._range("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        self._range("prompts", self.prompts >= 1, "must be >= 1")
        self._range("speed_rounds", self.speed_rounds >= 3,
                    "must be >= 3 (a median and its spread need three)")


@dataclass
class SweepConfig(Checked):
    section: ClassVar[str] = "sweep"

    k: tuple[float, ...] = field(default=(0.2, 0.4, 0.6, 0.8, 1.0), metadata=meta("--k"))
    """Comma list of k."""
    epochs: tuple[float, ...] = field(default=(1.0,), metadata=meta("--epochs"))
    """Comma list of epoch counts."""
    loss: tuple[Divergence, ...] = field(default=("fkl",), metadata=meta("--loss"))
    """Comma list of divergences."""
    seeds: tuple[int, ...] = (0,)
    """Comma list of seeds."""
    eval_split: Split = "test"
    """Split whose target cache the drafts are evaluated on."""
    single_pass: bool = False
    """Train the variants sharing seed and loss in one pass over the data."""
    select_split: Split | None = None
    """A cached split each variant is measured on after every epoch to keep its best epoch
    (best/), reported on --eval-split beside the final model (the paper's model selection)."""
    out: str = field(default="sweep", metadata=meta("--out"))
    """Sweep folder (one run folder a variant)."""

    def check(self) -> None:
        for name in ("k", "epochs", "loss", "seeds"):
            self._range(name, len(getattr(self, name)) >= 1, "must not be empty")
        for k in self.k:
            check_field(0.0 < k <= 1.0, "sweep.k", SweepConfig, f"must be in (0, 1], got {k}")
        for e in self.epochs:
            check_field(e > 0, "sweep.epochs", SweepConfig, f"must be > 0, got {e}")


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)
    """`section.key` names that the config file or a flag set; every other field is a default.
    Lets a run tell "the user asked for this value" from "nobody said" (e.g. data flags that
    must agree with a cache). Not saved: `to_dict` holds the sections only."""

    def to_dict(self, sections: tuple[str, ...] | None = None) -> dict:
        """The sections as plain data (tuples as lists), for config.yaml files."""
        return {name: as_plain(dataclasses.asdict(getattr(self, name)))
                for name in (sections or SECTIONS)}


def as_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    return value


SECTIONS: dict[str, type] = {
    "models": ModelsConfig, "data": DataConfig, "cache": CacheConfig, "train": TrainConfig,
    "eval": EvalConfig, "sweep": SweepConfig,
}
SECTION_OF: dict[type, str] = {cls: name for name, cls in SECTIONS.items()}
# Sections a run folder's config.yaml holds (what the training run used).
RUN_SECTIONS = ("models", "data", "cache", "train")
# Keys of those sections that say how a run reads its data, not what it trains on: a run is
# resumed whatever they are.
READING_KEYS = (("cache", "local_cache_mb"), ("cache", "local_cache_dir"))


def _renamed(merged: dict[str, dict[str, Any]]) -> None:
    """One-line errors for keys that changed meaning (see RENAMED)."""
    cache = merged.get("cache", {})
    if "topk" in cache and "draws" not in cache and cache.get("sparse", "sample") == "sample":
        new, why = RENAMED["cache.topk@sample"]
        raise UserError(f"cache.topk={cache['topk']} was given with --sparse sample: {why}; "
                        f"use {new}")


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
    _renamed(merged)
    built: dict[str, Any] = {}
    explicit = set()
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in merged[section].items():
            if name not in known:
                raise UserError(
                    f"unknown config key {section}.{name!r}; known: {', '.join(sorted(known))}"
                )
            kwargs[name] = coerce(value, hints[name], f"{section}.{name}")
            explicit.add(f"{section}.{name}")
        built[section] = cls(**kwargs)
    return Config(**built, explicit=frozenset(explicit))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (if given) and apply CLI overrides (`None` values are ignored)."""
    file_values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"config file {path} is a directory; pass a YAML file")
        if not path.is_file():
            raise UserError(f"config file {path} not found")
        try:
            file_values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise UserError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise UserError(
                f"config file {path} is not valid YAML: {str(err).splitlines()[0]}"
            ) from None
        if not isinstance(file_values, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
    return build_config(file_values, clean)
