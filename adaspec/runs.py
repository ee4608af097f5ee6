"""A training run's folder: its config, metrics log, checkpoints and final model.

    <run>/config.yaml       the resolved config, and the schedule it makes (`schedule:`)
    <run>/metrics.jsonl     one line per logged optimizer step
    <run>/checkpoints/      step-N/: weights, optimizer, scheduler, RNG and window state in
                            safetensors and JSON (`checkpoint.py`), progress.json (the latest kept)
    <run>/model/            save_pretrained folder (loads in plain transformers)
    <run>/best/             the best validated model (--keep-best), with best.json: its step,
                            epoch and validation numbers
    <run>/logs/             tracker output (--report-to)
    <run>/.adaspec-run.lock the lock a running training holds (see `owned`)

This module owns those names: everything else asks it for a run's parts.

A checkpoint without its progress file is an unfinished save and is ignored, so a run killed at
any moment resumes from the last whole checkpoint. A checkpoint carries its run's identity (the
run id config.yaml records, and the hash of the settings that define the training) and is
resumed only by that run: a checkpoint copied in from another run is refused.

What training deletes is only what it made: its own names inside the folder, never through a
link (a run folder whose own parts are symlinks is refused), and only `step-*` folders that hold
a checkpoint's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from adaspec import checkpoint as state
from adaspec.config import READING_KEYS, RUN_SECTIONS, Config
from adaspec.errors import UserError, check_output

PROGRESS_FILE = "progress.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
BEST_DIR = "best"
BEST_FILE = "best.json"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
LOCK_FILE = ".adaspec-run.lock"
RUN_KEY = "run"  # config.yaml's record of the run's identity: {"id": <hex>}
OWN_PARTS = (CONFIG_FILE, METRICS_FILE, MODEL_DIR, BEST_DIR, CHECKPOINTS_DIR, LOGS_DIR, LOCK_FILE)
# Settings a run may change on --resume (how it reads data; more epochs under a constant rate,
# see `extends`; where the folder now is): left out of the identity a checkpoint carries.
NOT_IDENTITY = (*READING_KEYS, ("train", "out"), ("train", "epochs"))


def model_dir(run_dir: Path) -> Path:
    """Where a run's final model is saved (a save_pretrained folder)."""
    return Path(run_dir) / MODEL_DIR


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints are kept (`step-N` folders, each with its progress file)."""
    return run_dir / CHECKPOINTS_DIR


def metrics_path(run_dir: Path) -> Path:
    """A run's metrics log (one JSON record per line)."""
    return run_dir / METRICS_FILE


def best_dir(run_dir: Path) -> Path:
    """Where a run's best validated model is kept (--keep-best)."""
    return Path(run_dir) / BEST_DIR


def logs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LOGS_DIR


def read_best(run_dir: Path) -> dict | None:
    """best.json of the best validated model (step, epoch, metric, validation), or None."""
    path = best_dir(run_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_best(run_dir: Path, record: dict) -> None:
    """Record which model best/ holds (after the model itself is saved there)."""
    (best_dir(run_dir) / BEST_FILE).write_text(json.dumps(record, indent=2))


def is_run_folder(path: Path) -> bool:
    """A folder holding any of a run's own files (config, metrics, final model)."""
    path = Path(path)
    return path.is_dir() and any(
        (path / name).exists() for name in (CONFIG_FILE, METRICS_FILE, MODEL_DIR))


def resolve_run_folder(spec: str) -> str:
    """A training run folder (`adaspec-train` output, with `model/config.json`) -> its model folder.

    Any other spec comes back unchanged, so every command can take a run folder wherever it takes
    a model, without the user having to know the run's layout.
    """
    path = Path(spec).expanduser()
    if (model_dir(path) / "config.json").is_file():
        return str(model_dir(path))
    return spec


def read_config(run_dir: Path | None) -> dict:
    """The run's resolved config.yaml (sections models/data/cache/train, schedule), or {}."""
    if run_dir is None or not (Path(run_dir) / CONFIG_FILE).is_file():
        return {}
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}); it is the run's record of "
                        "its settings: restore it or start a new run") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged (not a mapping of sections)")
    return config


def identity(config: dict) -> dict:
    """A run's identity as a checkpoint records it: the run id of its config.yaml and the
    SHA-256 of the settings that define what it trains (`NOT_IDENTITY` left out)."""
    settings = {section: {key: value for key, value in (config.get(section) or {}).items()
                          if (section, key) not in NOT_IDENTITY}
                for section in RUN_SECTIONS}
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return {"run_id": (config.get(RUN_KEY) or {}).get("id"),
            "config_sha256": hashlib.sha256(blob.encode()).hexdigest()}


def check_checkpoint_identity(run_dir: Path, checkpoint: Path) -> None:
    """Refuse a checkpoint written by another run (copied in) or under other settings."""
    mine = identity(read_config(run_dir))
    theirs = state.read_identity(checkpoint)
    if mine["run_id"] is None or theirs.get("run_id") != mine["run_id"]:
        raise UserError(
            f"checkpoint {checkpoint} was written by another run (run id "
            f"{theirs.get('run_id')!r}, this run {mine['run_id']!r}); remove it, or resume "
            "the run that wrote it")
    if theirs.get("config_sha256") != mine["config_sha256"]:
        raise UserError(
            f"checkpoint {checkpoint} was written under other settings than {run_dir}/"
            f"{CONFIG_FILE} records (config hash differs: the file was edited or replaced); "
            "restore it, or start a new run")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose progress file was written (an unfinished save is ignored)."""
    done = sorted(checkpoints_dir(run_dir).glob(f"step-*/{PROGRESS_FILE}"))
    return done[-1].parent if done else None


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, clear: bool = True) -> Path | None:
    """Whether training may write `run_dir`, and from which checkpoint; returns it (or None).

    A run folder is owned: training writes only into a new or empty folder, or one holding its
    own files (`config.yaml` is the marker training writes first). A folder holding anything
    else is refused, whatever it is. A run with a checkpoint or a model is continued only with
    --resume (and the same settings); a run killed before its first checkpoint has nothing to
    continue, so it starts over, with or without --resume.
    """
    entries = check_owner(run_dir)
    if not entries:
        if resume:
            raise UserError(f"nothing to resume in {run_dir} (no run there); drop --resume")
        return None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None and not model_dir(run_dir).exists():  # killed before any checkpoint
        if clear:
            discard_run(run_dir)
        return None
    if not resume:
        raise UserError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it or "
            "--out for a new folder"
        )
    if checkpoint is None:
        raise UserError(f"{run_dir} holds a finished run without checkpoints; nothing to resume "
                        "(use a new --out)")
    stored = read_config(run_dir)
    asked = cfg.to_dict(RUN_SECTIONS)
    for section in asked:
        for key in sorted(set(asked[section]) | set(stored.get(section, {}))):
            before, now = stored.get(section, {}).get(key), asked[section].get(key)
            if (before == now or (section, key) in READING_KEYS
                    or (section, key) == ("train", "out")  # a moved run folder resumes
                    or extends(section, key, before, now, cfg)):
                continue
            raise UserError(
                f"{run_dir} was run with {section}.{key}={before!r} but this run has {now!r}; "
                "resume with the same settings"
                + (" (a run is extended only under a constant learning rate)"
                   if (section, key) == ("train", "epochs") else ""))
    check_checkpoint_identity(run_dir, checkpoint)
    return checkpoint


def extends(section: str, key: str, before, now, cfg: Config) -> bool:
    """More epochs for a run under a constant learning rate: resuming it continues the same
    training (the same batches in the same order, the same rate) past its old end, so a run
    that had not stopped improving can be trained further instead of from scratch."""
    return ((section, key) == ("train", "epochs") and isinstance(before, (int, float))
            and now > before and cfg.train.lr_schedule == "constant")


def reopen_run(run_dir: Path) -> None:
    """A finished run trained further (`extends`) is unfinished again: its model is the shorter
    run's, so it goes before the config records the longer schedule, and a run killed while
    being extended reads as one to resume, never as finished at the new length."""
    check_owner(run_dir)
    _remove_tree(run_dir / MODEL_DIR)


def _remove_tree(path: Path) -> None:
    """Delete a folder training made; never a link (`check_owner` refuses those first)."""
    if path.is_symlink():
        raise UserError(f"{path} is a symlink; adaspec never deletes through a link: replace "
                        "it with a folder, or use a new --out")
    if path.is_dir():
        shutil.rmtree(path)


def discard_run(run_dir: Path) -> None:
    """Delete a run's own files (to start it over), nothing else; the marker goes last, so a
    half-cleared folder is still recognised as a run."""
    check_owner(run_dir)
    for folder in (CHECKPOINTS_DIR, BEST_DIR, LOGS_DIR, MODEL_DIR):
        _remove_tree(run_dir / folder)
    metrics_path(run_dir).unlink(missing_ok=True)
    (run_dir / CONFIG_FILE).unlink(missing_ok=True)


def check_owner(run_dir: Path) -> list[Path]:
    """Refuse a folder training may not write (a file, or a non-empty folder without the run
    marker); returns what it holds (nothing for a new or empty one)."""
    check_output(run_dir, "--out", folder=True)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
    linked = sorted(p.name for p in entries if p.name in OWN_PARTS and p.is_symlink())
    if linked:
        raise UserError(f"--out {run_dir}: its {linked[0]} is a symlink; training writes and "
                        "deletes a run's parts itself and never through a link: replace it "
                        "with a folder, or use a new --out")
    if entries and not (run_dir / CONFIG_FILE).is_file():
        shown = ", ".join(sorted(p.name for p in entries)[:3])
        raise UserError(f"--out {run_dir} is not empty and not a run folder (it holds {shown}); "
                        "choose a new or empty folder")
    return entries


@contextlib.contextmanager
def owned(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """Hold the run folder's lock while training writes it (`hold` False: another process of
    the same run holds it). A second training into the same folder is refused in one line; the
    kernel drops the lock when the process dies, so a killed run never leaves a stale one."""
    if not hold:
        yield
        return
    check_owner(run_dir)  # before the lock file: a foreign folder is left exactly as it was
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the context
    except OSError as err:
        raise UserError(f"cannot write the run folder {run_dir} ({err.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another training is writing {run_dir}; wait for it or choose "
                            "another --out") from None
        yield
    finally:
        handle.close()


def start_run_dir(run_dir: Path, cfg: Config, start_step: int,
                  schedule: dict | None = None, reference: dict | None = None) -> None:
    """Write the config (with the `schedule` the run follows: epochs, batch, optimizer steps,
    and the identity of the `reference` an AdaSPEC run selects against) and keep only the
    metrics of steps up to `start_step` (main process): an interrupted run may have logged
    steps past its last checkpoint; they are redone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = (read_config(run_dir).get(RUN_KEY) or {}).get("id") if start_step else None
    saved = {RUN_KEY: {"id": run_id or uuid.uuid4().hex}, **cfg.to_dict(RUN_SECTIONS)}
    if schedule is not None:
        saved["schedule"] = schedule
    if reference is not None:
        saved["reference"] = reference
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    kept = [record for record in read_metrics(run_dir) if record["step"] <= start_step]
    metrics_path(run_dir).write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_schedule(run_dir: Path) -> dict:
    """The schedule a run followed (epochs, batch_size, optimizer_steps, ...), from its config."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}: not a run folder")
    schedule = read_config(run_dir).get("schedule")
    if schedule is None:
        raise UserError(f"{run_dir / CONFIG_FILE} records no schedule (a run from before "
                        "schedules were kept)")
    return schedule


def is_finished(run_dir: Path, epochs: float | None = None) -> bool:
    """The one test of a finished run: its model is saved and its last optimizer step is its
    schedule's last (an extension rewrites the schedule before its first step, so a run killed
    mid-extension is not finished), and, given `epochs`, its schedule is at least that long."""
    if not (is_run_folder(run_dir) and (model_dir(run_dir) / "config.json").is_file()):
        return False
    schedule = read_schedule(run_dir)
    if epochs is not None and schedule["epochs"] < epochs:
        return False
    trained = training_metrics(run_dir)
    return bool(trained) and trained[-1]["step"] >= schedule["optimizer_steps"]


def log_metrics(run_dir: Path, record: dict) -> None:
    with metrics_path(run_dir).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl: training steps, and `validation` lines (validation.py)."""
    path = metrics_path(run_dir)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                  .splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"{path} line {number} is damaged (not a metrics record); restore "
                            "the file or start a new run")
        records.append(record)
    return records


def training_metrics(run_dir: Path) -> list[dict]:
    """The training-step lines of metrics.jsonl (loss, selected fraction, lr, ...)."""
    return [r for r in read_metrics(run_dir) if "loss" in r]


def is_checkpoint(path: Path) -> bool:
    """A `step-*` folder training wrote (a real folder holding a checkpoint's own files)."""
    return (path.is_dir() and not path.is_symlink() and path.name.startswith("step-")
            and any((path / name).is_file() for name in (
                PROGRESS_FILE, state.TRAINER_FILE, state.MODEL_FILE, state.process_files(0)[0])))


def save_checkpoint(accelerator, run_dir: Path, step: int, progress: dict, learner) -> None:
    """The learner's weights, optimizer and scheduler, every process's RNG and window, and the
    data position (`checkpoint.py`: safetensors and JSON); keep only the latest.

    The progress file is written last, by the main process after every process has saved, so a
    checkpoint without it is incomplete and ignored.
    """
    path = checkpoints_dir(run_dir) / f"step-{step:08d}"
    run_identity = identity(read_config(run_dir)) if accelerator.is_main_process else {}
    state.save(accelerator, path, accelerator.unwrap_model(learner.loss_model),
               learner.optimizer, learner.scheduler, learner.window, run_identity)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # what every process wrote, as written
        files = {p.name: file_sha256(p) for p in sorted(path.iterdir())
                 if p.is_file() and p.name != PROGRESS_FILE}
        (path / PROGRESS_FILE).write_text(json.dumps({**progress, "files": files}, indent=2))
        for old in checkpoints_dir(run_dir).glob("step-*"):
            if old != path and is_checkpoint(old):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint: Path, learner) -> dict:
    """Restore a checkpoint into the learner (weights, optimizer, scheduler) and this process's
    RNG and window; returns its progress record."""
    try:
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
    except (OSError, ValueError) as err:
        raise state.damaged(checkpoint / PROGRESS_FILE, err) from None
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int) \
            or not isinstance(progress.get("files"), dict):
        raise state.damaged(checkpoint / PROGRESS_FILE, "no step or no file digests")
    needed = {state.MODEL_FILE, state.OPTIMIZER_FILE, state.TRAINER_FILE,
              *state.process_files(accelerator.process_index)}
    for name in sorted(needed | set(progress["files"])):
        path = checkpoint / name
        if not path.is_file() or file_sha256(path) != progress["files"].get(name):
            raise state.damaged(path, "missing, or not the file the checkpoint wrote (SHA-256)")
    state.load(accelerator, checkpoint, accelerator.unwrap_model(learner.loss_model),
               learner.optimizer, learner.scheduler, learner.window)
    return progress


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
