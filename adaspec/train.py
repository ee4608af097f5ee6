"""Phase 2: train a draft (AdaSPEC), its reference (plain KD) or the target (SFT), in one loop.

`train(cfg)` reads micro-batches from the cache (`stream.BatchStream`), computes each label
token's divergence between the model and the cached target rows with the chunked sparse loss,
keeps the tokens the stage's rule selects, and steps AdamW; it writes a run folder:

    <run>/config.yaml       the resolved config
    <run>/metrics.jsonl     one line per optimizer step
    <run>/checkpoints/      step-N/: accelerate state + progress.json (the latest one is kept)
    <run>/model/            save_pretrained folder (loads in plain transformers)

Stages. `ref`: plain KD of the draft initialisation against the target (k = 1), recorded in the
cache's manifest so that `adaspec-cache build --model ref` finds it. `draft`: AdaSPEC keeps the
fraction k of tokens with the largest delta = draft_loss - ref_loss (ref_loss read from the
cache), or SpecKD keeps tokens whose draft argmax is the target's top-1; k = 1 keeps every token
(DistillSpec-style plain KD, needs no reference). `sft`: cross-entropy of the target on the label
tokens, written as forward KL against a one-hot target so it shares the chunked loss.

`online` computes the target's (and the reference's) outputs live with dense divergences instead
of reading the cache: the baseline the cache replaces, and the check that both give one loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections import deque
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from adaspec import build, losses, models, selection, tasks
from adaspec.config import Config
from adaspec.errors import UserError
from adaspec.stream import Batch, BatchStream, online_sequences
from cache_tools import schema, store
from cache_tools.errors import CacheError
from cache_tools.store import CacheReader

GLOBAL_WINDOW = 50  # micro-batches of deltas behind the running "global" AdaSPEC threshold
PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------
# Settings


def resolve_config(cfg: Config) -> Config:
    """The config a run really uses: k = 1 for the ref and sft stages, the run folder filled in."""
    train_cfg = cfg.train
    if train_cfg.stage in ("ref", "sft") and train_cfg.k != 1.0:
        train_cfg = dataclasses.replace(train_cfg, k=1.0)
    if train_cfg.out is None:
        t = train_cfg
        name = f"{t.stage}-{cfg.data.task}-k{t.k:g}-{t.loss}-s{t.seed}"
        train_cfg = dataclasses.replace(train_cfg, out=str(Path("runs") / name))
    return dataclasses.replace(cfg, train=train_cfg)


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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights) only; biases and norm gains are vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# The trained model and its per-token loss


def one_hot_target(label_ids: torch.Tensor) -> losses.SparseTarget:
    """(N,) int64 labels as a SparseTarget of one atom with p = 1: forward KL is then CE."""
    n = label_ids.shape[0]
    return losses.SparseTarget(
        ids=label_ids.view(n, 1),
        logprobs=torch.zeros((n, 1), device=label_ids.device),
        tail_logmass=torch.full((n,), -math.inf, device=label_ids.device),
    )


class LossModel(torch.nn.Module):
    """The trained causal LM plus its per-token loss at the label positions.

    The loss lives in `forward` so that under DDP every parameter use (the lm_head used by the
    chunked loss included) happens inside the wrapped module's forward.
    """

    def __init__(self, model, vocab_size: int, divergence: str, beta: float, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.divergence = divergence
        self.beta = beta
        self.chunk_tokens = chunk_tokens
        self.plain_head = build._has_plain_head(model)
        head = model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else vocab_size
        if rows < vocab_size:
            raise UserError(
                f"the model's head has {rows} rows but the tokenizer has {vocab_size} ids; "
                "the model does not match the tokenizer"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        index_b: torch.Tensor,
        index_t: torch.Tensor,
        target: losses.SparseTarget | None = None,
        target_logits: torch.Tensor | None = None,
        want_argmax: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token loss against `target` (sparse, chunked) or `target_logits` (dense).

        Args:
            input_ids, attention_mask: (B, T) int64.
            index_b, index_t: (N,) int64 label positions (see `stream.Batch`).
            target: cached rows of the N label tokens, or
            target_logits: (N, V) float target logits at the same positions (online mode).
            want_argmax: also return the model's argmax at the label positions.

        Returns:
            ((N,) float32 loss, (N,) int64 argmax or None).
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        head = self.model.get_output_embeddings()
        if self.plain_head:
            hidden = self.model.base_model(**inputs).last_hidden_state[index_b, index_t]  # (N, H)
            if target_logits is None:
                loss = losses.sparse_divergence_chunked(
                    hidden, head.weight, target, self.divergence, self.beta, self.chunk_tokens,
                    lm_head_bias=head.bias, vocab_size=self.vocab_size,
                )
                argmax = None
                if want_argmax:
                    with torch.no_grad():
                        argmax = torch.cat([
                            models.cut_logits(head(part), self.vocab_size).argmax(-1)
                            for part in hidden.split(self.chunk_tokens)
                        ]) if len(hidden) else hidden.new_zeros(0, dtype=torch.long)
                return loss, argmax
            logits = head(hidden)  # (N, V')
        else:
            logits = self.model(**inputs).logits[index_b, index_t]  # (N, V')
        logits = models.cut_logits(logits, self.vocab_size)  # (N, V)
        if target_logits is not None:
            loss = losses.dense_divergence(logits, target_logits, self.divergence, self.beta)
        else:
            loss = losses.sparse_divergence(logits, target, self.divergence, self.beta)
        return loss, logits.detach().argmax(-1) if want_argmax else None


def _target_top1(target: losses.SparseTarget | None, target_logits: torch.Tensor | None):
    """(N,) int64 the target's most likely token: the id with the largest cached log-prob."""
    if target_logits is not None:
        return target_logits.argmax(-1)
    best = target.entry_logprobs().argmax(-1, keepdim=True)  # (N, 1): never an empty slot
    return target.ids.long().gather(1, best).squeeze(1)


def _to(target: losses.SparseTarget | None, device) -> losses.SparseTarget | None:
    if target is None:
        return None
    return losses.SparseTarget(*(None if x is None else x.to(device) for x in (
        target.ids, target.logprobs, target.tail_logmass, target.counts)))


# ---------------------------------------------------------------------------------------------
# Run folder, checkpoints, the cache manifest


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose progress file was written (an unfinished save is ignored)."""
    done = sorted((run_dir / "checkpoints").glob(f"step-*/{PROGRESS_FILE}"))
    return done[-1].parent if done else None


def _check_run_dir(run_dir: Path, cfg: Config, resume: bool) -> Path | None:
    """Refuse to overwrite a run, or to resume one with other settings; returns the checkpoint."""
    saved = run_dir / "config.yaml"
    if not resume:
        if saved.exists():
            raise UserError(
                f"run folder {run_dir} already holds a run; pass --resume to continue it or "
                "--out for a new folder"
            )
        return None
    checkpoint = _latest_checkpoint(run_dir)
    if checkpoint is None or not saved.exists():
        raise UserError(f"nothing to resume in {run_dir} (no checkpoint); drop --resume")
    stored = yaml.safe_load(saved.read_text())
    asked = cfg.to_dict()
    for section in asked:
        for key in sorted(set(asked[section]) | set(stored.get(section, {}))):
            if stored.get(section, {}).get(key) != asked[section].get(key):
                raise UserError(
                    f"{run_dir} was run with {section}.{key}={stored.get(section, {}).get(key)!r} "
                    f"but this run has {asked[section].get(key)!r}; resume with the same settings"
                )
    return checkpoint


def _save_checkpoint(accelerator, run_dir: Path, step: int, progress: dict, window: deque) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) + data position; keep only the latest.

    The progress file is written last, by the main process after every process has saved, so a
    checkpoint without it is incomplete and ignored.
    """
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    # Not safetensors: tied embeddings share storage, which safetensors refuses.
    accelerator.save_state(str(path), safe_serialization=False)
    torch.save(list(window), path / f"window_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
        for old in (run_dir / "checkpoints").glob("step-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _split_group(cfg: Config, mode: str):
    root = store.open_root(cfg.cache.cache, mode=mode)
    return root[store.split_path(cfg.data.task, cfg.data.split)]


def _cached_split_exists(cfg: Config) -> bool:
    """True if the cache holds the split with a complete sequences stage."""
    try:
        manifest = store.read_manifest(_split_group(cfg, "r"))
    except (CacheError, KeyError):
        return False
    return store.stage_status(manifest, schema.SEQUENCES) == schema.STATUS_COMPLETE


def record_ref(cfg: Config, run_dir: Path, steps: int) -> None:
    """Write the trained reference into the split's manifest under `refs[cfg.cache.ref_name]`."""
    group = _split_group(cfg, "a")
    manifest = store.read_manifest(group)
    model_path = str((run_dir / "model").resolve())
    manifest.setdefault("refs", {})[cfg.cache.ref_name] = {
        "path": model_path,
        "run": str(run_dir.resolve()),
        "weight_hash": models.model_identity(model_path)["weight_hash"],
        "init": cfg.models.draft,
        "init_identity": models.model_identity(cfg.models.draft),
        "loss": cfg.train.loss,
        "epochs": cfg.train.epochs,
        "steps": steps,
    }
    store.write_manifest(group, manifest)


def _same_weights(a: dict, b: dict) -> bool:
    """Two `models.model_identity` records name the same weights (unknown hashes pass)."""
    if a.get("weight_hash") is None or b.get("weight_hash") is None:
        return True
    return a["weight_hash"] == b["weight_hash"] and a.get("layers") == b.get("layers")


def _short(identity: dict) -> str:
    return f"{identity.get('path')} (weights {str(identity.get('weight_hash'))[:12]})"


def check_reference(cfg: Config, manifest: dict) -> None:
    """Refuse cached reference losses that are stale, or a draft that starts elsewhere.

    AdaSPEC's delta = L_draft - L_ref is meaningful only if the stored L_ref come from the
    reference this run names (`--ref`, else the one the ref stage recorded in the manifest) and
    that reference was trained from the draft's initialisation. The ref stage stores the weight
    hash of the model it scored; the record of the ref training stores its init's identity.
    An explicit `--ref` that no ref stage of this cache recorded has no known init: only its
    losses are checked, since there is nothing to compare the draft with.
    """
    stage = schema.ref_group_name(cfg.cache.ref_name)
    built = manifest["stages"][stage]["params"]["model"]
    record = manifest.get("refs", {}).get(cfg.cache.ref_name)
    where = f"{cfg.cache.cache}/{cfg.data.task}/{cfg.data.split}"
    rebuild = (f"`adaspec-cache build --model ref --cache {cfg.cache.cache} --task "
               f"{cfg.data.task} --split {cfg.data.split} --ref-name {cfg.cache.ref_name}")
    if manifest["stages"][stage]["params"].get("target") != (
            manifest["stages"][schema.TARGET]["params"]):
        raise UserError(
            f"the cached reference losses '{stage}' in {where} were computed against another "
            f"target stage than the one stored now; rebuild them with {rebuild} --rebuild`"
        )
    named_spec = cfg.models.ref or (record or {}).get("path")
    if named_spec is not None:
        try:
            named = models.model_identity(named_spec)
        except UserError as err:
            raise UserError(f"the reference {named_spec} cannot be found ({err})") from None
        if not _same_weights(built, named):
            raise UserError(
                f"the cached reference losses '{stage}' in {where} were built from "
                f"{_short(built)} but the reference is now {_short(named)}; rebuild them with "
                f"{rebuild} --model-path {named_spec} --rebuild`"
            )
    if record is None or "init_identity" not in record or not _same_weights(built, record):
        return  # a reference trained elsewhere: its initialisation is not known here
    draft = models.model_identity(cfg.models.draft)
    if not _same_weights(record["init_identity"], draft):
        raise UserError(
            f"the reference '{cfg.cache.ref_name}' was trained from {record['init']} but this "
            f"draft starts from {cfg.models.draft}; AdaSPEC compares a draft with a reference of "
            "the same initialisation: pass --draft " + str(record["init"]) + " or train a "
            "reference from this draft (`adaspec-train --stage ref`)"
        )


# Data flags that change which sequences a split holds; a cached run must agree with the cache.
DATA_KEYS = ("data_files", "limit", "max_length", "chat_template", "seed")


def check_data(cfg: Config, manifest: dict) -> None:
    """Refuse data flags that disagree with the cache's sequences (the cache defines the data).

    Only values the config file or a flag set are compared: an unset flag means "as cached".
    """
    stored = manifest["stages"][schema.SEQUENCES]["params"]
    for key in DATA_KEYS:
        if f"data.{key}" not in cfg.explicit:
            continue
        asked = getattr(cfg.data, key)
        if key == "data_files":
            have = stored.get("data_files_hash")
            same = (asked is None and have is None) or (
                asked is not None and have is not None and tasks.data_files_hash(asked) == have)
            shown_have = "another file" if have else "the hub's data"
        else:
            have = stored.get(key)
            same = asked == have
            shown_have = repr(have)
        if not same:
            flag = "--data-seed" if key == "seed" else "--" + key.replace("_", "-")
            raise UserError(
                f"the cache's {cfg.data.task}/{cfg.data.split} sequences were built with "
                f"{key}={shown_have} but this run asks {flag} {asked!r}; drop {flag} (the cache "
                f"defines the data) or build a cache for it with another --cache"
            )


def _recorded_ref_path(cfg: Config) -> str:
    if cfg.models.ref:
        return cfg.models.ref
    if _cached_split_exists(cfg):
        recorded = store.read_manifest(_split_group(cfg, "r")).get("refs", {})
        if cfg.cache.ref_name in recorded:
            return recorded[cfg.cache.ref_name]["path"]
    raise UserError(
        f"--stage draft with k={cfg.train.k:g} needs a reference model: run `adaspec-train "
        "--stage ref` first (it records itself in the cache) or pass --ref PATH"
    )


# ---------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class _Data:
    stream: BatchStream
    vocab_size: int
    target_model: object | None = None  # online mode
    ref_model: object | None = None  # online mode, AdaSPEC with k < 1


def _needs_ref(cfg: Config) -> bool:
    t = cfg.train
    return t.stage == "draft" and t.k < 1.0 and t.selection == "adaspec"


def _open_cache(cfg: Config) -> tuple[CacheReader | None, str | None]:
    """Check what the run needs from the cache before any weights load (errors come fast).

    Returns (the reader, or None for an online run without a cache; the reference spec of an
    online AdaSPEC run, else None).
    """
    t = cfg.train
    if t.online:
        # A cache holding the split defines the data (as for a cached run: its sequences may be
        # target-generated); without one the task is tokenized here exactly as a build would.
        reader = None
        if _cached_split_exists(cfg):
            reader = CacheReader(cfg.cache.cache, cfg.data.task, cfg.data.split, require=())
            check_data(cfg, reader.manifest)
        return reader, _recorded_ref_path(cfg) if _needs_ref(cfg) else None
    require = () if t.stage == "sft" else (schema.TARGET,)
    reader = CacheReader(cfg.cache.cache, cfg.data.task, cfg.data.split, require=require)
    check_data(cfg, reader.manifest)
    if _needs_ref(cfg):
        stage = schema.ref_group_name(cfg.cache.ref_name)
        if store.stage_status(reader.manifest, stage) != schema.STATUS_COMPLETE:
            raise UserError(
                f"--stage draft with k={t.k:g} needs the reference losses '{stage}' in "
                f"{cfg.cache.cache}/{cfg.data.task}/{cfg.data.split}; run `adaspec-train --stage "
                "ref` then `adaspec-cache build --model ref` (or use --k 1.0)"
            )
        check_reference(cfg, reader.manifest)
        if t.loss == "jsd" and t.beta != 0.5:
            raise UserError(
                f"the cache's jsd reference losses use beta=0.5, not --beta {t.beta:g}; use "
                "beta 0.5 or --online"
            )
    return reader, None


def _open_data(cfg: Config, reader: CacheReader | None, ref_spec: str | None, tokenizer, device,
               rank: int, world: int) -> _Data:
    """The batch stream of this process, and in online mode the frozen target and reference."""
    t = cfg.train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if reader is not None:
        _check_tokenizer(reader, tokenizer, cfg)
    if t.online:
        sequences = reader if reader is not None else online_sequences(cfg, tokenizer)
        data = _Data(BatchStream(sequences, t.batch_size, t.seed, pad_id, rank=rank,
                                 world_size=world), models.real_vocab_size(tokenizer))
        if t.stage != "sft":
            dtype = build.resolve_dtype(cfg.models.dtype, device)
            data.target_model = _frozen(cfg.models.target, dtype, device, tokenizer,
                                        cfg.models.device_map)
            if ref_spec is not None:
                data.ref_model = _frozen(ref_spec, dtype, device, tokenizer)
        return data
    assert reader is not None
    ref = (cfg.cache.ref_name, t.loss) if _needs_ref(cfg) else None
    stream = BatchStream(reader, t.batch_size, t.seed, pad_id, with_target=t.stage != "sft",
                         ref=ref, rank=rank, world_size=world)
    return _Data(stream, int(reader.manifest["vocab_size"]))


def _check_tokenizer(reader: CacheReader, tokenizer, cfg: Config) -> None:
    stored = reader.manifest["stages"][schema.SEQUENCES]["params"]["tokenizer_fingerprint"]
    if models.tokenizer_fingerprint(tokenizer) != stored:
        raise UserError(
            f"the model to train uses another tokenizer than the cache {cfg.cache.cache}; the "
            "draft, reference and target must share one tokenizer"
        )


def _frozen(spec: str, dtype, device, tokenizer, device_map: str | None = None):
    """A model that only gives outputs (target or reference), on the device, eval mode."""
    model, its_tokenizer = models.load_model(spec, dtype=dtype, device_map=device_map)
    models.shared_vocab_size(tokenizer, its_tokenizer)
    if device_map is None:
        model.to(device)
    return model.eval().requires_grad_(False)


def _label_logits(model, batch: Batch, pad_id: int, vocab_size: int) -> torch.Tensor:
    """(N, V) float32 logits of a frozen model at the batch's label positions."""
    seqs, masks = batch.seqs_and_masks()
    n, logits_fn = build.label_hidden_and_head(model, seqs, masks, pad_id)
    return models.cut_logits(logits_fn(0, n), vocab_size)


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    cfg: Config, resume: bool = False, progress: bool = True, max_steps: int | None = None
) -> Path:
    """Train per `cfg.train` and return the run folder (see the module docstring).

    Works in one process or under `accelerate launch` (data-parallel: each process reads its own
    micro-batches). `resume` continues from the latest checkpoint of the run folder to the same
    final weights as an uninterrupted run (on CPU). `max_steps` stops after that optimizer step
    without saving the model, like an interrupted run (a time budget; resume continues it).
    """
    from accelerate import Accelerator

    cfg = resolve_config(cfg)
    t = cfg.train
    run_dir = Path(t.out)
    # Accumulation is done by hand below (gradient_accumulation_steps=1 here): the official
    # normaliser is the label-token count of the whole accumulated batch, known only once all its
    # micro-batches are read, and the last step of a fractional epoch may have fewer micro-batches;
    # accelerate's own accumulation divides every loss by a fixed count instead.
    # cpu=True without CUDA: accelerate only sets up multi-process CPU (gloo) runs when told so.
    precision = mixed_precision(t.mixed_precision, cfg.models.dtype)
    # accelerate's state is a process-wide singleton that refuses a second mixed-precision
    # setting; a process that trains several runs (a sweep, the tests) resets it when the
    # setting changes. Its distributed part (PartialState) is kept.
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                              gradient_accumulation_steps=1)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    checkpoint = _check_run_dir(run_dir, cfg, resume)
    torch.manual_seed(t.seed)

    reader, ref_spec = _open_cache(cfg)
    spec = cfg.models.target if t.stage == "sft" else cfg.models.draft
    # fp32 master weights whatever --dtype says (see `mixed_precision`).
    model, tokenizer = models.load_model(spec, dtype=torch.float32)
    model.to(device).train()
    data = _open_data(cfg, reader, ref_spec, tokenizer, device, rank, world)
    stream = data.stream
    per_epoch = stream.batches_per_epoch
    if per_epoch == 0:
        raise UserError(
            f"{stream.sequences.n_sequences} sequences make fewer than {world} batches of "
            f"--batch-size {t.batch_size}; lower --batch-size or use fewer processes"
        )
    epochs = t.epochs / t.k if t.scale_epochs_by_k else t.epochs
    total_micro = max(1, round(epochs * per_epoch))  # micro-batches per process
    total_steps = -(-total_micro // t.grad_accum)
    stop_step = total_steps if max_steps is None else min(total_steps, max_steps)
    pad_id = stream.pad_id
    need_ref = _needs_ref(cfg)
    speckd = t.stage == "draft" and t.k < 1.0 and t.selection == "speckd"

    loss_model = LossModel(model, data.vocab_size, "fkl" if t.stage == "sft" else t.loss, t.beta,
                           t.chunk_tokens)
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)
    # The scheduler is not passed to prepare(): accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, t.lr_schedule, t.warmup_steps)
    )
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    # Deltas of the last micro-batches, for threshold "global": a whole-data quantile of
    # delta = draft_loss - ref_loss cannot be precomputed since the draft changes as it trains, so
    # the threshold is the (1 - k) quantile over a sliding window of recent tokens (this process).
    window: deque = deque(maxlen=GLOBAL_WINDOW)
    start_step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler and RNG states
        saved = json.loads((checkpoint / PROGRESS_FILE).read_text())
        start_step, elapsed_before = saved["step"], saved["elapsed"]
        window.extend(torch.load(checkpoint / f"window_{rank}.pt"))
    accelerator.wait_for_everyone()  # every process has checked the run folder before it is written
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        # An interrupted run may have logged steps past its last checkpoint: they are redone.
        kept = [line for line in lines if json.loads(line)["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    batches = stream.batches(start_batch=start_step * t.grad_accum, stop_batch=total_micro)
    bar = tqdm(total=total_steps, initial=start_step, desc=f"{t.stage} {cfg.data.task}",
               unit="step", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for step in range(start_step, stop_step):
            step_started = time.perf_counter()
            first = step * t.grad_accum
            group = [next(batches) for _ in range(min(t.grad_accum, total_micro - first))]
            # Official normaliser: label tokens of the whole accumulated batch over all processes,
            # divided by the process count since DDP averages the gradients of the processes.
            counts = torch.tensor([sum(b.n_labels for b in group)], dtype=torch.float64,
                                  device=device)
            label_norm = float(accelerator.reduce(counts, "sum")) / world
            lr = scheduler.get_last_lr()[0]
            # loss, kept tokens, label tokens, tokens, non-finite per-token losses
            totals = torch.zeros(5, dtype=torch.float64, device=device)

            for i, batch in enumerate(group):
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                last = i == len(group) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(loss_model):
                    target = _to(batch.target, device)
                    # A cached row with NaN/+inf values (the build refuses them; an old or
                    # hand-made store may hold some) is emptied: loss 0, no gradient, counted.
                    valid = None
                    if target is not None:
                        valid = target.valid_rows()  # (N,) bool
                        target = target.emptied(~valid)
                    target_logits = ref_loss = None
                    if data.target_model is not None:
                        with torch.no_grad():
                            target_logits = _label_logits(data.target_model, batch, pad_id,
                                                          data.vocab_size)
                    if need_ref:
                        if data.ref_model is not None:
                            with torch.no_grad():
                                ref_logits = _label_logits(data.ref_model, batch, pad_id,
                                                           data.vocab_size)
                                ref_loss = losses.dense_divergence(ref_logits, target_logits,
                                                                   t.loss, t.beta)
                        else:
                            ref_loss = batch.ref_loss.to(device)
                    if t.stage == "sft":
                        target = one_hot_target(batch.label_ids.to(device))
                    per_token, draft_argmax = loss_model(
                        batch.input_ids.to(device), batch.attention_mask.to(device),
                        batch.index_b.to(device), batch.index_t.to(device),
                        target=target, target_logits=target_logits, want_argmax=speckd,
                    )  # (N,) float32, (N,) int64 | None

                    # A non-finite loss (a diverged model, a bad target row) is never learned
                    # from, and never silently: it is counted in the metrics, and AdaSPEC's
                    # threshold is taken over the finite tokens only.
                    finite = torch.isfinite(per_token.detach())  # (N,) bool
                    if valid is not None:
                        finite &= valid
                    ranked = torch.where(finite, per_token.detach(), math.nan)  # (N,)

                    # Which tokens the model learns from this micro-batch.
                    if speckd:
                        keep = selection.speckd_gate(draft_argmax,
                                                     _target_top1(target, target_logits))
                    elif need_ref:
                        threshold: str | float = "batch"
                        if t.threshold == "global":
                            delta = (per_token.detach() - ref_loss).float()[finite].cpu()
                            window.append(delta)  # (finite N,) a host copy: "global" syncs
                            threshold = selection.global_threshold(torch.cat(list(window)), t.k)
                        keep = selection.adaspec_select(ranked, ref_loss, t.k, threshold)
                    else:  # k = 1: the reference, SFT and plain-KD drafts learn every token
                        keep = torch.ones_like(per_token, dtype=torch.bool)
                    keep = keep & finite

                    if t.normalize == "all":
                        loss = selection.reduce_loss(per_token, keep, label_norm, "all")
                    else:  # paper Eq. 10 per micro-batch, averaged over the accumulated ones
                        loss = selection.reduce_loss(per_token, keep, 1, "selected") / len(group)
                    accelerator.backward(loss)
                totals += torch.tensor([float(loss.detach()), float(keep.sum()), batch.n_labels,
                                        batch.n_tokens, float((~finite).sum())],
                                       dtype=torch.float64, device=device)

            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(loss_model.parameters(), t.max_grad_norm)
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 overflow skips the step, and its LR
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            totals = accelerator.reduce(totals, "sum")
            now = time.perf_counter()
            micro_done = first + len(group)
            record = {
                "step": step + 1,
                "epoch": micro_done / per_epoch,
                "loss": float(totals[0]) / world,
                "selected_fraction": float(totals[1] / totals[2].clamp_min(1)),
                "nonfinite_tokens": int(totals[4]),
                "lr": lr,
                "tokens_per_s": float(totals[3]) / max(now - step_started, 1e-9),
                "elapsed": elapsed_before + now - started,
            }
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

            epoch_ended = micro_done // per_epoch > first // per_epoch
            if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or epoch_ended:
                position = {"step": step + 1, "micro_batches": micro_done,
                            "epoch": micro_done // per_epoch,
                            "batch_in_epoch": micro_done % per_epoch,
                            "elapsed": record["elapsed"]}
                _save_checkpoint(accelerator, run_dir, step + 1, position, window)
    finally:
        batches.close()
        bar.close()

    if stop_step < total_steps:
        return run_dir
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(loss_model).model
        models.save_model(trained, tokenizer, run_dir / "model")
        if t.stage == "ref" and _cached_split_exists(cfg):
            record_ref(cfg, run_dir, total_steps)
    accelerator.wait_for_everyone()
    return run_dir
