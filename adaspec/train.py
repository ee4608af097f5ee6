"""Phase 2: train a draft (AdaSPEC), its reference (plain KD) or the target (SFT), in one loop.

`train(cfg)` reads micro-batches from the cache (`stream.BatchStream`), asks the teacher chosen
for the stage what each label token should be (`step.CachedTeacher`: the cached target rows and
reference losses; `step.OnlineTeacher`: live models, the `--online` baseline; `step.LabelTeacher`:
SFT), lets the learner keep the tokens its rule selects and steps AdamW (`step.Learner`), and
writes a run folder (`runs.py`).

Stages. `ref`: plain KD of the draft initialisation against the target (k = 1), recorded in the
cache's manifest so that `adaspec-cache build --model ref` finds it. `draft`: AdaSPEC keeps the
fraction k of tokens with the largest delta = draft_loss - ref_loss (ref_loss read from the
cache), or SpecKD keeps tokens whose draft argmax is the target's top-1; k = 1 keeps every token
(DistillSpec-style plain KD, needs no reference). `sft`: cross-entropy of the target on the label
tokens, written as forward KL against a one-hot target so it shares the chunked loss.

The loop itself is `fit.fit` (shared with the single-pass sweep).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaspec import draft_vocab, models, provenance, runs, step, tasks
from adaspec.config import RUN_SECTIONS, Config
from adaspec.errors import UserError
from adaspec.fit import EpochHooks, LearnerRun, check_weights, fit
from adaspec.step import Learner, LossModel
from adaspec.stream import BatchStream, online_sequences
from adaspec.validation import Validator, plateau, validation_records
from cache_tools import schema
from cache_tools.store import CacheReader

# ---------------------------------------------------------------------------------------------
# Settings


def resolve_config(cfg: Config) -> Config:
    """The config a run really uses: k = 1 for the ref and sft stages, the stage's learning
    rate when none is given, the run folder filled in."""
    train_cfg = dataclasses.replace(cfg.train, lr=cfg.train.learning_rate)
    if train_cfg.stage in ("ref", "sft") and train_cfg.k != 1.0:
        train_cfg = dataclasses.replace(train_cfg, k=1.0)
    if train_cfg.out is None:
        t = train_cfg
        name = f"{t.stage}-{cfg.data.task}-k{t.k:g}-{t.loss}-s{t.seed}"
        train_cfg = dataclasses.replace(train_cfg, out=str(Path("runs") / name))
    return dataclasses.replace(cfg, train=train_cfg)


def accelerator_for(cfg: Config, run_dir: Path | None = None):
    """An accelerate Accelerator for the config's mixed precision (fp32 weights, autocast) and,
    with `--report-to`, its trackers logging under `run_dir/logs`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    precision = step.mixed_precision(cfg.train.mixed_precision, cfg.models.dtype)
    # accelerate's state is a process-wide singleton that refuses a second mixed-precision
    # setting; a process that trains several runs (a sweep, the tests) resets it when the
    # setting changes. Its distributed part (PartialState) is kept.
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()
    # Accumulation is done by hand (gradient_accumulation_steps=1): the official normaliser is
    # the label-token count of the whole accumulated batch, and the last step of a fractional
    # epoch may have fewer micro-batches; accelerate's own accumulation divides by a fixed count.
    # cpu=True without CUDA: accelerate only sets up multi-process CPU (gloo) runs when told so.
    trackers = {}
    step.check_tracker(cfg.train.report_to)
    if cfg.train.report_to is not None and run_dir is not None:
        trackers = {"log_with": cfg.train.report_to, "project_config": ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(runs.logs_dir(run_dir)))}
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                       gradient_accumulation_steps=1, **trackers)


def tracker_config(cfg: Config) -> dict:
    """The run's config as flat hyperparameters (trackers take scalars and strings)."""
    flat = {}
    for section, values in cfg.to_dict(RUN_SECTIONS).items():
        for key, value in values.items():
            flat[f"{section}/{key}"] = value if isinstance(value, (int, float, str, bool)) \
                else str(value)
    return flat


# ---------------------------------------------------------------------------------------------
# Data and teacher


def open_cache(cfg: Config) -> tuple[CacheReader | None, str | None]:
    """Check what the run needs from the cache before any weights load (errors come fast).

    Returns (the reader, or None for an online run without a cache; the reference spec of an
    online AdaSPEC run, else None).
    """
    t = cfg.train
    if t.online:
        # A cache holding the split defines the data (as for a cached run: its sequences may be
        # target-generated); without one the task is tokenized here exactly as a build would.
        reader = provenance.open_split(cfg)
        if reader is not None:
            provenance.check_data(cfg, reader)
        return reader, provenance.reference_spec(cfg) if cfg.train.needs_ref else None
    require = () if t.stage == "sft" else (schema.TARGET,)
    reader = provenance.reader_of(cfg, require=require)
    provenance.check_data(cfg, reader)
    if cfg.train.needs_ref:
        stage = schema.ref_group_name(cfg.cache.ref_name)
        if not reader.manifest.is_complete(stage):
            raise UserError(
                f"--stage draft with k={t.k:g} needs the reference losses '{stage}' in "
                f"{cfg.cache.cache}/{cfg.data.task}/{cfg.data.split}; run `adaspec-train --stage "
                "ref` then `adaspec-cache build --model ref` (or use --k 1.0)"
            )
        provenance.check_reference(cfg, reader)
        if t.loss == "jsd" and t.beta != 0.5:
            raise UserError(
                f"the cache's jsd reference losses use beta=0.5, not --beta {t.beta:g}; use "
                "beta 0.5 or --online"
            )
    return reader, None


def _frozen(spec: str, dtype, device, tokenizer, device_map: str | None = None):
    """A model that only gives outputs (target or reference), on the device, eval mode."""
    model, its_tokenizer = models.load_frozen(spec, dtype, device, device_map)
    models.shared_vocab_size(tokenizer, its_tokenizer, spec, "the model trained")
    return model


def open_data(cfg: Config, reader: CacheReader | None, ref_spec: str | None, tokenizer, device,
              rank: int, world: int):
    """(this process's batch stream, the stage's teacher, the vocabulary size)."""
    t = cfg.train
    pad_id = models.pad_id(tokenizer)
    if reader is not None:
        provenance.check_tokenizer(reader, tokenizer)
    if t.online:
        sequences = reader if reader is not None else online_sequences(cfg, tokenizer)
        stream = BatchStream(sequences, t.run_batch_size, t.seed, pad_id, rank=rank,
                             world_size=world,
                             memory_budget_mb=t.stream_memory_mb)
        vocab_size = models.real_vocab_size(tokenizer)
        if t.stage == "sft":
            return stream, step.LabelTeacher(), vocab_size
        dtype = models.resolve_dtype(cfg.models.dtype, device)
        target = _frozen(cfg.models.target, dtype, device, tokenizer, cfg.models.device_map)
        ref = _frozen(ref_spec, dtype, device, tokenizer) if ref_spec is not None else None
        return stream, step.OnlineTeacher(target, ref, vocab_size, t.loss, t.beta), vocab_size
    assert reader is not None
    ref = (cfg.cache.ref_name, t.loss) if cfg.train.needs_ref else None
    stream = BatchStream(reader, t.run_batch_size, t.seed, pad_id, with_target=t.stage != "sft",
                         ref=ref, rank=rank, world_size=world,
                         memory_budget_mb=t.stream_memory_mb)
    teacher = step.LabelTeacher() if t.stage == "sft" else step.CachedTeacher()
    return stream, teacher, reader.vocab_size


@dataclass
class TrainInputs:
    """What a run trains from (`open_inputs`): the cache and its reference, the model with its
    head reduced, on its device in train mode, and the data as a stream with its teacher."""

    reader: CacheReader | None
    ref_spec: str | None
    reference: dict | None  # the reference's identity, recorded in the run folder
    model: torch.nn.Module
    tokenizer: object
    stream: BatchStream
    teacher: object
    vocab_size: int

    @property
    def per_epoch(self) -> int:
        return self.stream.batches_per_epoch


def open_inputs(cfg: Config, accelerator) -> TrainInputs:
    """The one training setup `train` and the sweep's single pass share: the cache (and the
    reference: its spec and identity), the model (fp32 master weights whatever --dtype says,
    see `step.mixed_precision`; --draft-vocab's reduced head), the stream (checked against the
    batch size and the processes) and its teacher. The model is not compiled (`compiled`)."""
    t = cfg.train
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    reader, ref_spec = open_cache(cfg)
    reference = provenance.reference_identity(cfg, reader, ref_spec) if t.needs_ref else None
    spec = cfg.models.target if t.stage == "sft" else cfg.models.draft
    model, tokenizer = models.load_model(spec, dtype=torch.float32)
    reduce_vocabulary(cfg, reader, model, tokenizer)
    model.to(device).train()
    stream, teacher, vocab_size = open_data(cfg, reader, ref_spec, tokenizer, device, rank, world)
    check_stream(t, stream, world)
    return TrainInputs(reader, ref_spec, reference, model, tokenizer, stream, teacher, vocab_size)


def compiled(model, t):
    """--compile: the model's trunk compiled; the chunked head and loss stay eager."""
    if t.compile:
        model.base_model.compile()
    return model


# ---------------------------------------------------------------------------------------------
# The loop


def make_learner(accelerator, model, cfg: Config, vocab_size: int, total_steps: int) -> Learner:
    """The model wrapped with its loss, AdamW and LR schedule, prepared for `accelerator`."""
    t = cfg.train
    loss_model = LossModel(model, vocab_size, "fkl" if t.stage == "sft" else t.loss, t.beta,
                           t.chunk_tokens)
    optimizer = torch.optim.AdamW(step.param_groups(model, t.weight_decay), lr=t.lr)
    # The scheduler is not passed to prepare(): accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: step.lr_factor(s, total_steps, t.lr_schedule, t.warmup_steps)
    )
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    # The scheduler is checkpointed by `runs.save_checkpoint` as JSON; registered with accelerate
    # it would be pickled (and unpickled, code and all, on --resume).
    rule = t.selection if t.stage == "draft" else "adaspec"
    return Learner(loss_model, optimizer, scheduler, rule, t.k, t.threshold, t.normalize)


def reduce_vocabulary(cfg: Config, reader: CacheReader | None, model, tokenizer) -> None:
    """--draft-vocab: give the model a reduced head over the training split's token map; an
    AdaSPEC draft's map must be its reference's (their losses are compared token by token)."""
    t = cfg.train
    ids = None
    if t.draft_vocab is not None:
        if reader is None or not reader.manifest.is_complete(schema.TARGET):
            raise UserError(
                f"--draft-vocab picks its ids from the cached target of {cfg.data.task}/"
                f"{cfg.data.split} in {cfg.cache.cache}; build it first (`adaspec-cache build "
                "--model target`)")
        ids = draft_vocab.token_map(reader, t.draft_vocab, draft_vocab.special_ids(tokenizer))
    if cfg.train.needs_ref:
        provenance.check_reference_vocab(cfg, reader, ids)
    if ids is not None:
        draft_vocab.reduce_head(model, ids)


def check_stream(t, stream, world: int) -> None:
    """The run's batch fits the split and every process gets batches (train and the sweep)."""
    n_sequences = stream.sequences.n_sequences
    if t.run_batch_size > n_sequences:  # the stream would cap it, and the schedule be wrong
        asked = (f"b/k = {t.batch_size}/{t.k:g} = {t.run_batch_size} (--official-schedule)"
                 if t.official_schedule else str(t.run_batch_size))
        raise UserError(f"--batch-size {asked} is larger than the split's {n_sequences} "
                        "sequences; lower --batch-size or use more data")
    if stream.batches_per_epoch == 0:
        raise UserError(
            f"{n_sequences} sequences make fewer than {world} batches of "
            f"--batch-size {t.run_batch_size}; lower --batch-size or use fewer processes"
        )


def prepare_run(accelerator, cfg: Config, model, per_epoch: int, vocab_size: int) -> LearnerRun:
    """A run of `model` per cfg.train (its learner, folder and length) over a stream of
    `per_epoch` micro-batches per process: what `train` and the single-pass sweep both run."""
    t = cfg.train
    learner = make_learner(accelerator, model, cfg, vocab_size, t.optimizer_steps(per_epoch))
    return LearnerRun(learner, Path(t.out), t.micro_batches(per_epoch), t.grad_accum,
                      t.log_every, t.max_grad_norm)


def schedule_of(t, per_epoch: int, total_steps: int, world: int) -> dict:
    """What the run's settings make of the data: recorded in its config.yaml."""
    return {"epochs": t.run_epochs, "batch_size": t.run_batch_size, "grad_accum": t.grad_accum,
            "processes": world, "micro_batches_per_epoch": per_epoch,
            "sequences_per_step": t.run_batch_size * t.grad_accum * world,
            "optimizer_steps": total_steps,
            "rule": "official" if t.official_schedule else
            "epochs-by-k" if t.scale_epochs_by_k else "fixed"}


def report_plateau(run_dir: Path, total_steps: int, metric: str, progress: bool) -> dict:
    """Log (and print) whether validation had stopped improving by the run's end."""
    p = plateau(validation_records(run_dir), metric)
    runs.log_metrics(run_dir, {"step": total_steps, "plateau": p})
    if progress:
        change = "n/a" if p["change"] is None else f"{p['change'] * 100:+.2f} pt"
        tqdm.write(f"plateau ({metric}, mean of the last quarter of steps minus the quarter "
                   f"before): {change} -> "
                   f"{'reached' if p['reached'] else 'NOT reached (still improving)'}")
    return p


def train(
    cfg: Config, resume: bool = False, progress: bool = True, max_steps: int | None = None
) -> Path:
    """Train per `cfg.train` and return the run folder (see the module docstring).

    Works in one process or under `accelerate launch` (data-parallel: each process reads its own
    micro-batches). `resume` continues from the latest checkpoint of the run folder to the same
    final weights as an uninterrupted run (on CPU). `max_steps` stops after that optimizer step
    without saving the model, like an interrupted run (a time budget; resume continues it).
    """
    cfg = resolve_config(cfg)
    run_dir = Path(cfg.train.out)
    accelerator = accelerator_for(cfg, run_dir)
    with contextlib.ExitStack() as owner:
        return _train(cfg, accelerator, run_dir, resume, progress, max_steps, owner)


def _train(cfg: Config, accelerator, run_dir: Path, resume: bool, progress: bool,
           max_steps: int | None, owner: contextlib.ExitStack) -> Path:
    t = cfg.train
    world = accelerator.num_processes
    tasks.check_files(cfg.data.data_files)  # before any model loads
    if t.stage == "ref":
        provenance.check_can_record_ref(cfg)
    # Checked now (nothing written), again under the folder's lock before the first write.
    checkpoint = runs.check_run_dir(run_dir, cfg, resume, clear=False)
    torch.manual_seed(t.seed)

    inputs = open_inputs(cfg, accelerator)
    reference, tokenizer = inputs.reference, inputs.tokenizer
    if checkpoint is not None:
        provenance.check_same_reference(run_dir, runs.read_config(run_dir).get("reference"),
                                        reference)
    per_epoch = inputs.per_epoch
    run = prepare_run(accelerator, cfg, compiled(inputs.model, t), per_epoch, inputs.vocab_size)
    total_steps = run.total_steps
    stop_step = run.total_steps if max_steps is None else min(run.total_steps, max_steps)

    validator = None
    if t.eval_split is not None and accelerator.is_main_process:
        validator = Validator(cfg, run_dir, tokenizer)
    start_step = 0
    if checkpoint is not None:
        saved = runs.load_checkpoint(accelerator, checkpoint, run.learner)
        start_step, run.elapsed_before = saved["step"], float(saved.get("elapsed", 0.0))
    owner.enter_context(runs.owned(run_dir, hold=accelerator.is_main_process))
    if accelerator.is_main_process:  # a run killed before its first checkpoint is cleared now
        runs.check_run_dir(run_dir, cfg, resume)
        if start_step < run.total_steps:  # trained further: the saved model is not its end
            runs.reopen_run(run_dir)
    accelerator.wait_for_everyone()  # every process has checked the run folder before it is written
    if accelerator.is_main_process:
        runs.start_run_dir(run_dir, cfg, start_step, schedule_of(t, per_epoch, total_steps, world),
                           reference)
    if t.report_to is not None:
        accelerator.init_trackers(run_dir.name, config=tracker_config(cfg))

    hooks = EpochHooks(accelerator, cfg, run, per_epoch, validator, progress)
    fit(accelerator, [run], inputs.stream, inputs.teacher, start_step, stop_step, progress,
        f"{t.stage} {cfg.data.task}", hooks)
    if t.report_to is not None:
        accelerator.end_training()
    if stop_step < run.total_steps:
        return run_dir
    accelerator.wait_for_everyone()
    if validator is not None:
        report_plateau(run_dir, run.total_steps, t.best_metric, progress)
    check_weights(accelerator, run, run.total_steps)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(run.learner.loss_model).model
        models.save_model(trained, tokenizer, runs.model_dir(run_dir))
        if t.stage == "ref" and provenance.open_split(cfg) is not None:
            provenance.record_ref(cfg, run_dir, run.total_steps)
    accelerator.wait_for_everyone()
    return run_dir
