"""Nothing adaspec reads runs code, is taken from another run, or deletes through a link.

The reproductions of issue 33 (a probe as an attacker would): a pickle planted in any file of a
run folder never runs; a checkpoint copied from another run is refused; a run whose own parts
are symlinks is refused and nothing outside it is deleted; a moved run folder resumes.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_metrics, train_config

from adaspec import runs
from adaspec.cli.common import run
from adaspec.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickled, it creates `marker`: code running where only data was expected."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path, how: str = "torch") -> None:
    """Replace `path` with a pickle that creates `marker` when loaded with code allowed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch":
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_runs_when_unpickled(tmp_path):
    """The planted files are real exploits: loaded the way accelerate loaded its custom state."""
    for how in ("torch", "pickle"):
        marker = tmp_path / f"ran-{how}"
        plant(tmp_path / how, marker, how)
        if how == "torch":
            torch.load(tmp_path / how, weights_only=False)
        else:
            pickle.loads((tmp_path / how).read_bytes())
        assert marker.exists()


def outcome(capsys, fn) -> tuple[int, str]:
    """(exit code, stderr) of `fn` run as a CLI runs it; a failure must be one line, no
    traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(lambda _argv: fn() and 0, [])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    code = exit_info.value.code or 0
    assert "Traceback" not in err, err[-2000:]
    if code:
        assert code == 2 and len(lines) == 1, err[-2000:]
    return code, (lines[-1] if lines else "")


def config(env, out: Path, lr: float = 1e-4, checkpoint_every: int = 2):
    return train_config(env, k=1.0, epochs=1, lr=lr, checkpoint_every=checkpoint_every, out=out)


def resume(env, out: Path, lr: float = 1e-4, again: bool = True):
    """`adaspec-train --resume` (or without it: `again` False) of a run of `config`."""
    return lambda: train(config(env, out, lr), resume=again, progress=False)


def stopped_run(env, out: Path, lr: float = 1e-4) -> Path:
    """A run stopped after its step-2 checkpoint (of 4 steps), as if killed there."""
    train(config(env, out, lr), progress=False, max_steps=2)
    assert runs.latest_checkpoint(out) is not None and not runs.model_dir(out).exists()
    return out


@pytest.fixture(scope="module")
def stopped(env, tmp_path_factory) -> Path:
    return stopped_run(env, tmp_path_factory.mktemp("trust") / "run")


ACCELERATE_NAMES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "pytorch_model.bin",
                    "optimizer.bin", "scheduler.bin", "window_0.pt")


def test_a_pickle_planted_in_any_checkpoint_file_never_runs(env, stopped, tmp_path, capsys):
    """Every file of the checkpoint, and the names accelerate pickled under, replaced by a
    payload in turn: --resume refuses it in one line or ignores it; the payload never runs."""
    checkpoint = runs.latest_checkpoint(stopped)
    names = sorted({p.name for p in checkpoint.iterdir()} | set(ACCELERATE_NAMES))
    for i, name in enumerate(names):
        run_dir = tmp_path / f"run{i}"
        shutil.copytree(stopped, run_dir)
        marker = tmp_path / f"ran-{i}"
        plant(runs.latest_checkpoint(run_dir) / name, marker)
        code, err = outcome(capsys, resume(env, run_dir))
        assert not marker.exists(), name
        if name not in ACCELERATE_NAMES:  # a file the checkpoint wrote: refused, named
            assert code == 2 and name in err, (name, err)


def test_a_pickle_planted_in_a_run_folders_own_files_never_runs(env, stopped, tmp_path, capsys):
    for i, name in enumerate((runs.CONFIG_FILE, runs.METRICS_FILE)):
        run_dir = tmp_path / f"run{i}"
        shutil.copytree(stopped, run_dir)
        marker = tmp_path / f"ran-{i}"
        plant(run_dir / name, marker, "pickle")
        code, _ = outcome(capsys, resume(env, run_dir))
        assert code == 2 and not marker.exists()


def test_a_checkpoint_copied_from_another_run_is_refused(env, stopped, tmp_path, capsys):
    """Run A's checkpoint copied into run B: --resume B fails in one line (it used to continue
    A's weights at A's learning rate while B's config.yaml recorded its own)."""
    for lr, why in ((1e-4, "another run"), (3e-4, "another run")):
        other = stopped_run(env, tmp_path / f"b-{lr:g}", lr=lr)
        shutil.rmtree(other / "checkpoints")
        shutil.copytree(stopped / "checkpoints", other / "checkpoints")
        code, err = outcome(capsys, resume(env, other, lr))
        assert code == 2 and why in err, err


def test_a_checkpoint_under_an_edited_config_is_refused(env, stopped, tmp_path, capsys):
    """config.yaml edited after the checkpoint (its lr, and the flags made to match)."""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    config = run_dir / runs.CONFIG_FILE
    config.write_text(config.read_text().replace("lr: 0.0001", "lr: 0.0003"))
    code, err = outcome(capsys, resume(env, run_dir, 3e-4))
    assert code == 2 and "config hash" in err, err


def test_a_moved_run_folder_resumes(env, stopped, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.copytree(stopped, moved)
    code, err = outcome(capsys, resume(env, moved))
    assert code == 0, err
    assert runs.model_dir(moved).is_dir() and len(run_metrics(moved)) == 4


@pytest.mark.parametrize("part", [runs.CHECKPOINTS_DIR, runs.MODEL_DIR, runs.BEST_DIR,
                                  runs.LOGS_DIR])
def test_a_run_whose_own_part_is_a_symlink_is_refused_and_nothing_outside_is_deleted(
        env, stopped, tmp_path, capsys, part):
    """A symlinked checkpoints/ used to lose every other step-* folder of the linked folder
    (a user's file with it) when the run restarted or saved its next checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    outside = tmp_path / "outside"
    shutil.copytree(run_dir / runs.CHECKPOINTS_DIR, outside)
    (outside / "step-00000001").mkdir()
    (outside / "step-00000001" / "mine.txt").write_text("a user's file")
    (outside / "notes.txt").write_text("keep")
    if (run_dir / part).exists():
        shutil.rmtree(run_dir / part)
    os.symlink(outside, run_dir / part)
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    for again in (True, False):  # resumed, or restarted (refused: it holds a run)
        code, err = outcome(capsys, resume(env, run_dir, again=again))
        assert code == 2 and "symlink" in err, err
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before


def test_a_run_killed_before_its_first_checkpoint_is_cleared_but_not_through_a_link(
        env, tmp_path, capsys):
    """`discard_run` (a restart of a run with no checkpoint) deletes only the run's own files."""
    run_dir = tmp_path / "run"
    train(config(env, run_dir, checkpoint_every=0), progress=False, max_steps=1)
    assert runs.latest_checkpoint(run_dir) is None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.txt").write_text("a user's file")
    os.symlink(outside, run_dir / runs.LOGS_DIR)
    code, err = outcome(capsys, resume(env, run_dir, again=False))
    assert code == 2 and "symlink" in err, err
    assert (outside / "mine.txt").read_text() == "a user's file"
    (run_dir / runs.LOGS_DIR).unlink()
    code, err = outcome(capsys, resume(env, run_dir, again=False))  # cleared, retrained
    assert code == 0, err


def test_only_checkpoints_training_made_are_deleted(env, stopped, tmp_path, capsys):
    """Saving a checkpoint drops the older ones it made, not other step-* entries."""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    mine = run_dir / runs.CHECKPOINTS_DIR / "step-mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = outcome(capsys, resume(env, run_dir))
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "keep"
    assert [p.name for p in (run_dir / runs.CHECKPOINTS_DIR).iterdir()
            if p.name != "step-mine"] == ["step-00000004"]


# ---------------------------------------------------------------------------------------------
# Model folders


def eval_outcome(capsys, env, draft: Path) -> tuple[int, str]:
    from adaspec.cli import eval as eval_cli

    def evaluate():
        return eval_cli.main(["--cache", str(env.cache), "--task", "gsm8k", "--split", "train",
                              "--target", str(env.target), "--draft", str(draft), "--modes",
                              "offline", "--no-progress"])
    return outcome(capsys, evaluate)


def test_a_saved_model_without_its_hash_file_is_refused(env, tmp_path, capsys):
    """A copy that drops adaspec-weights.sha256 used to turn the weight check off."""
    from adaspec import models

    folder = tmp_path / "model"
    shutil.copytree(runs.model_dir(env.ref_run), folder)
    (folder / models.WEIGHTS_HASH_FILE).unlink()
    code, err = eval_outcome(capsys, env, folder)
    assert code == 2 and models.WEIGHTS_HASH_FILE in err, err
    with pytest.raises(Exception, match="is missing"):
        models.load_model(str(folder))


def test_a_model_with_non_finite_weights_is_refused(env, tmp_path, capsys):
    """eval used to print [nan, nan] with exit 0; a folder saved by another tool included."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(env.target, folder)  # saved by plain transformers: no hash recorded
    [weights] = list(folder.glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    code, err = eval_outcome(capsys, env, folder)
    assert code == 2 and "nan/inf" in err, err


def test_an_official_schedule_batch_larger_than_the_split_is_refused(env, tmp_path, capsys):
    """b/k = 4/0.4 = 10 sequences of a split of 8: it used to be capped silently at 8 (and the
    recorded schedule said 10)."""
    cfg = train_config(env, k=0.4, batch_size=4, official_schedule=True, out=tmp_path / "run")
    code, err = outcome(capsys, lambda: train(cfg, progress=False))
    assert code == 2 and "larger than the split's 8 sequences" in err, err


def test_a_pickle_planted_in_any_file_of_a_model_folder_never_runs(env, tmp_path, capsys):
    """A run's model/ (hash recorded) and a folder saved by plain transformers (an export's
    kind): each file replaced by a payload in turn, and a pytorch_model.bin planted in place of
    the safetensors: loading refuses it in one line or ignores it; the payload never runs."""
    from adaspec import models

    for kind, source in (("run model", runs.model_dir(env.ref_run)), ("plain", env.target)):
        names = sorted(p.name for p in Path(source).iterdir() if p.is_file())
        for i, name in enumerate([*names, "pytorch_model.bin"]):
            folder = tmp_path / f"{kind}-{i}"
            shutil.copytree(source, folder)
            marker = tmp_path / f"ran-{kind}-{i}"
            if name == "pytorch_model.bin":
                for weights in folder.glob("*.safetensors"):
                    weights.unlink()
            plant(folder / name, marker)
            outcome(capsys, lambda f=folder: models.load_model(str(f)) and None)
            assert not marker.exists(), (kind, name)


def test_an_export_over_a_symlink_is_refused_and_nothing_is_deleted(tmp_path):
    """--overwrite replaces --out: a link to an earlier export is refused, its target kept."""
    from types import SimpleNamespace

    from adaspec import export
    from adaspec.errors import UserError

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / export.EXPORT_MARKER).write_text("{}")
    (earlier / "model.safetensors").write_text("kept")
    link = tmp_path / "link"
    os.symlink(earlier, link)
    source = SimpleNamespace(model_spec=str(tmp_path / "draft"), run_dir=None)
    with pytest.raises(UserError, match="symlink"):
        export.check_out_dir(link, True, source)
    assert (earlier / "model.safetensors").read_text() == "kept"
