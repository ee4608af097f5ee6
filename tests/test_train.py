"""Phase 2 end to end on tiny models: cached == online losses, ref/draft/sft stages, resume, DDP.

The tiny target's lm_head is scaled up so its distributions are peaked (per-token KL of order
0.1 instead of 1e-4 for a near-uniform random model), which makes loss comparisons meaningful.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import GSM8K, REPO, run_metrics, run_weights, train_config

from adaspec.cli.common import run
from adaspec.cli.train import main as cli_main
from adaspec.config import RUN_SECTIONS
from adaspec.errors import UserError
from adaspec.step import lr_factor
from adaspec.train import resolve_config, train
from cache_tools import store
from cache_tools.manifest import Manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ref_stage_records_itself_and_the_ref_build_finds_it(env):
    group = store.open_root(str(env.cache), "r")["gsm8k/train"]
    recorded = Manifest.read(group).refs["ref"]
    assert recorded["path"] == str((env.ref_run / "model").resolve())
    stage = env.manifest.stage("ref/ref")
    assert stage.complete
    assert stage.params["model"]["path"] == recorded["path"]
    assert yaml.safe_load((env.ref_run / "config.yaml").read_text())["train"]["k"] == 1.0
    assert env.ref_run.name == "ref" and len(run_metrics(env.ref_run)) == 8


@pytest.mark.parametrize("k,selection", [(1.0, "adaspec"), (0.5, "adaspec"), (0.5, "speckd")])
def test_cached_and_online_runs_give_the_same_losses(env, k, selection):
    """Same batches, same selection, same losses step by step.

    The cache (K = V) stores the target's log-probs as float16 (relative error <= 2**-11) and the
    reference losses were computed from those values, while the online run uses float32 logits:
    the first step agrees to ~1e-5 relative, and the weights then drift apart by what those
    rounding errors do to the gradients (~4e-4 relative after 8 steps at lr 1e-4): rtol 2e-3 at
    k = 1. With k < 1 the same rounding (~1e-4 on each delta or on near-tied argmaxes) can also
    swap which token sits just above the selection threshold (the count kept is the same): one
    swap moves a micro-batch loss by (l_i - l_j) / N, up to ~1% here: rtol 1e-2.
    """
    name = f"{k}-{selection}"
    cached = train(train_config(env, k=k, selection=selection, out=env.root / f"c{name}"),
                   progress=False)
    # AdaSPEC online reads its sequences and the recorded reference from the cache; the others
    # run without any cache, tokenizing the task themselves.
    no_cache = None if selection == "adaspec" and k < 1 else {"cache": str(env.root / "none")}
    online = train(train_config(env, no_cache, k=k, selection=selection, online=True,
                                out=env.root / f"o{name}"), progress=False)
    a, b = run_metrics(cached), run_metrics(online)
    assert len(a) == len(b) == 8
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b],
                               rtol=2e-3 if k == 1.0 else 1e-2)
    if k == 1.0:  # the first step runs on identical weights
        assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-4)
    assert [m["selected_fraction"] for m in a] == [m["selected_fraction"] for m in b]
    fractions = [m["selected_fraction"] for m in a]
    if k == 1.0:
        assert fractions == [1.0] * 8
    elif selection == "adaspec":
        assert all(0.45 <= f <= 0.56 for f in fractions)  # quantile rule: about half per batch
    else:
        assert all(0.0 < f < 1.0 for f in fractions)


def test_outputs_config_metrics_and_assistant_model(env):
    from transformers import AutoModelForCausalLM

    run_dir = train(train_config(env, k=1.0, epochs=0.5, out=env.root / "outputs"), progress=False)
    metrics = run_metrics(run_dir)
    assert len(metrics) == 2  # half of 4 batches
    assert set(metrics[0]) == {"step", "epoch", "loss", "selected_fraction", "nonfinite_tokens",
                               "lr", "tokens_per_s", "elapsed"}
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["epoch"] == 0.5
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    schedule = saved.pop("schedule")  # what the settings made of the data
    assert len(saved.pop("run")["id"]) == 32  # the run's identity, which checkpoints carry
    assert (schedule["optimizer_steps"], schedule["micro_batches_per_epoch"]) == (2, 4)
    assert saved == resolve_config(train_config(env, k=1.0, epochs=0.5, out=run_dir)).to_dict(
        RUN_SECTIONS)
    draft = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    target = AutoModelForCausalLM.from_pretrained(env.target).eval()
    assert draft.config.num_hidden_layers == 1
    prompt = torch.tensor([env.tok("Natalia sold clips to")["input_ids"]])
    plain = target.generate(prompt, max_new_tokens=8, do_sample=False)
    assisted = target.generate(prompt, max_new_tokens=8, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)
    with pytest.raises(UserError, match="--resume"):
        train(train_config(env, k=1.0, epochs=0.5, out=run_dir), progress=False)


def test_draft_without_reference_stage_is_one_line_error(env, capsys):
    argv = ["--cache", str(env.cache), "--task", "gsm8k", "--data-files", str(GSM8K),
            "--limit", "8", "--target", str(env.target), "--draft", f"{env.target}@layers=1",
            "--stage", "draft", "--k", "0.4", "--ref-name", "other", "--out",
            str(env.root / "noref"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        run(cli_main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "adaspec-train --stage ref" in err and "adaspec-cache build --model ref" in err
    # Online, with no cache to find a recorded reference in and no --ref.
    cfg = train_config(env, {"cache": str(env.root / "nocache")}, k=0.4, online=True,
                       out=env.root / "noref2")
    with pytest.raises(UserError, match="adaspec-train --stage ref"):
        train(cfg, progress=False)
    assert not (env.root / "nocache").exists()


def _mean_ce(model_dir: Path, cache: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reader = store.CacheReader(str(cache), "gsm8k", "train")
    total, count = 0.0, 0
    for s in range(reader.n_sequences):
        ids, mask = reader.sequence(s)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.from_numpy(ids)[None]).logits[0], -1)
        pos = np.nonzero(mask)[0]
        total -= float(logprobs[pos - 1, ids[pos]].sum())
        count += len(pos)
    return total / count


def test_sft_stage_lowers_cross_entropy_on_its_data(env):
    run_dir = train(train_config(env, stage="sft", epochs=3, lr=3e-3, out=env.root / "sft"),
                    progress=False)
    before, after = _mean_ce(env.target, env.cache), _mean_ce(run_dir / "model", env.cache)
    assert after < 0.8 * before
    # CE of the first step is that of the untrained target on the first batch.
    assert run_metrics(run_dir)[0]["loss"] > run_metrics(run_dir)[-1]["loss"]


def test_resume_after_interruption_gives_identical_weights(env):
    values = dict(k=0.5, threshold="global", grad_accum=2, batch_size=1, epochs=1.5,
                  lr_schedule="cosine", warmup_steps=1, checkpoint_every=2, lr=1e-3)
    whole = train(train_config(env, **values, out=env.root / "whole"), progress=False)
    cut = env.root / "cut"
    train(train_config(env, **values, out=cut), progress=False, max_steps=5)  # dies after step 5
    assert not (cut / "model").exists()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-00000004"]
    assert len(run_metrics(cut)) == 5
    with pytest.raises(UserError, match="train.lr"):
        train(train_config(env, **{**values, "lr": 1e-2}, out=cut), resume=True, progress=False)
    train(train_config(env, **values, out=cut), resume=True, progress=False)
    a, b = run_weights(whole), run_weights(cut)
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    ma, mb = run_metrics(whole), run_metrics(cut)
    assert len(ma) == 6  # 8 batches/epoch * 1.5 = 12 micro-batches, 2 per step
    assert [(m["step"], m["loss"], m["lr"]) for m in ma] == [(m["step"], m["loss"], m["lr"])
                                                             for m in mb]


def test_lr_schedule():
    assert [lr_factor(s, 10, "constant", 2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 10, "cosine", 2) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] > 0 and np.all(np.diff(cosine[1:]) <= 0)
    assert lr_factor(10, 10, "cosine", 2) == pytest.approx(0.0)


def test_two_processes_train_like_one_process_with_the_combined_batch(env):
    """2 processes x 2 sequences see, per step, the 4 sequences one process with batch 4 sees.

    k = 1 here: with k < 1 each process takes its own quantile over its own micro-batch (as the
    official code under DDP does), which differs from one quantile over the combined batch.
    """
    out = env.root / "ddp"
    # `--cpu --num_processes 2` would start ONE process (accelerate's simple launcher); the
    # torchrun-based launcher starts two, and train() picks gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no",
           "-m", "adaspec.cli.train", "--cache", str(env.cache), "--task", "gsm8k",
           "--data-files", str(GSM8K), "--limit", "8", "--max-length", "512",
           "--target", str(env.target), "--draft", f"{env.target}@layers=1",
           "--k", "1.0", "--batch-size", "2", "--epochs", "2", "--lr", "1e-3",
           "--out", str(out), "--no-progress"]
    envvars = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=envvars, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1  # printed by the main process only
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    assert len(run_metrics(out)) == 4  # 4 batches per epoch shared by 2 processes, 2 epochs
    saved = os.listdir(out / "checkpoints" / "step-00000004")  # the end of epoch 2
    assert {"process-1.safetensors", "process-1.json", "progress.json"} <= set(saved)
    single = train(train_config(env, k=1.0, batch_size=4, lr=1e-3, out=env.root / "single"),
                   progress=False)
    a, b = run_weights(out), run_weights(single)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_sigkill_mid_run_then_resume_gives_identical_weights(env):
    """A real crash: the CLI process is SIGKILLed after a checkpoint, then resumed."""
    import signal
    import time

    def cli(out: Path):
        cmd = [sys.executable, "-m", "adaspec.cli.train", "--cache", str(env.cache),
               "--task", "gsm8k", "--target", str(env.target), "--draft", f"{env.target}@layers=1",
               "--k", "0.5", "--batch-size", "1", "--epochs", "2", "--lr", "1e-3",
               "--checkpoint-every", "2", "--seed", "3", "--out", str(out), "--no-progress"]
        if out.exists():
            cmd.append("--resume")
        return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    whole = cli(env.root / "sig-whole")
    assert whole.wait(timeout=600) == 0
    cut = env.root / "sig-cut"
    proc = cli(cut)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = list(cut.glob("checkpoints/*/progress.json"))
        if done and int(done[0].parent.name.split("-")[1]) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (cut / "model").exists()
    resumed = cli(cut)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-2000:]
    a, b = run_weights(env.root / "sig-whole"), run_weights(cut)
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def test_official_schedule_gives_k_the_optimizer_steps_of_plain_kd(env, tmp_path):
    """8 rows, b = 2, E = 2: k = 1 takes 8 steps of 2 sequences; k = 0.5 on the official
    schedule takes 4 epochs at batch 4, also 8 steps, and keeps half the tokens of each step;
    --scale-epochs-by-k keeps the batch and takes twice the steps."""
    plain = train(train_config(env, k=1.0, epochs=2, out=tmp_path / "r"), progress=False)
    official = train(train_config(env, k=0.5, epochs=2, official_schedule=True, out=tmp_path / "a"),
                     progress=False)
    scaled = train(train_config(env, k=0.5, epochs=2, scale_epochs_by_k=True, out=tmp_path / "s"),
                   progress=False)
    sched = {name: yaml.safe_load((run / "config.yaml").read_text())["schedule"]
             for name, run in (("plain", plain), ("official", official), ("scaled", scaled))}
    assert sched["plain"]["optimizer_steps"] == sched["official"]["optimizer_steps"] == 8
    assert sched["scaled"]["optimizer_steps"] == 16
    assert (sched["official"]["epochs"], sched["official"]["batch_size"]) == (4.0, 4)
    assert (sched["scaled"]["epochs"], sched["scaled"]["batch_size"]) == (4.0, 2)
    assert sched["official"]["rule"] == "official" and sched["plain"]["rule"] == "fixed"
    steps = [r for r in run_metrics(official) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[-1]["epoch"] == pytest.approx(4.0)
    assert all(0.4 <= r["selected_fraction"] <= 0.6 for r in steps)
    # resuming with the same flags is accepted (the schedule is re-derived, not re-scaled)
    saved = yaml.safe_load((official / "config.yaml").read_text())["train"]
    assert saved["epochs"] == 2 and saved["batch_size"] == 2 and saved["official_schedule"]


def test_official_schedule_and_scaled_epochs_are_exclusive(env, tmp_path):
    with pytest.raises(UserError, match="two schedules"):
        train_config(env, k=0.5, official_schedule=True, scale_epochs_by_k=True, out=tmp_path / "x")


def test_a_finished_run_extended_to_more_epochs_equals_the_longer_run(env, tmp_path):
    """Under a constant learning rate, --resume with more --epochs continues the same training
    past its old end: the weights equal a run trained that long from the start."""
    values = {"k": 0.5, "lr": 1e-3, "batch_size": 2}
    whole = train(train_config(env, **values, epochs=2.0, out=tmp_path / "whole"), progress=False)
    short = train(train_config(env, **values, epochs=1.0, out=tmp_path / "ext"), progress=False)
    assert [m["step"] for m in run_metrics(short)] == [1, 2, 3, 4]
    # killed while being extended: no longer finished (its model was the shorter run's)
    train(train_config(env, **values, epochs=2.0, out=tmp_path / "ext"), resume=True,
          progress=False, max_steps=6)
    assert not (short / "model").exists()
    assert yaml.safe_load((short / "config.yaml").read_text())["schedule"]["optimizer_steps"] == 8
    extended = train(train_config(env, **values, epochs=2.0, out=tmp_path / "ext"), resume=True,
                     progress=False)
    a, b = run_weights(whole), run_weights(extended)
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    assert [m["loss"] for m in run_metrics(whole)] == [m["loss"] for m in run_metrics(extended)]
    with pytest.raises(UserError, match="constant learning rate"):
        train(train_config(env, **values, epochs=3.0, lr_schedule="cosine", out=tmp_path / "ext"),
              resume=True, progress=False)
