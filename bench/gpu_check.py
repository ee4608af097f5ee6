"""The GPU check: the whole pipeline on one CUDA device, then the stream and step benches there.

Randomly initialised models with the paper pair's shapes (configs/gpu_check/: Pythia-1.4B
target, Pythia-31M draft, 50,304-row padded heads) and the embedded SmolLM2 tokenizer, on the
offline `arith` task: speed does not depend on the weights (acceptance is checked on CPU with
real models). Steps, each timed, each allowed to fail without stopping the independent ones:

1. target cache of the train split (default cache: 8 draws, uint8q) and of a test split
   (top-64 float16), on the GPU;
2. the reference (plain KD, k = 1), its losses stored in the cache, an AdaSPEC draft (k = 0.4),
   offline evaluation of the draft on the test split: each through its CLI, as a user runs it;
3. bf16 vs fp32: the same 8 steps at lr 1e-5 with bf16 autocast and without; the fraction of
   the draft's weights each moved (fp32 master weights make them equal);
4. `bench.stream` (stream rate, the step split on the GPU) and `bench.train_step` on the device.

It prints the draft's step time, the share of it spent waiting on data, label tokens/s, peak
GPU memory and the bf16 verdict, and writes everything to --out. Run through
`bench/gpu_check.sh` (which installs the carried wheels); `--tiny --allow-cpu` runs the same
script with tiny shapes on a CPU (its smoke test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import harness
from adaspec import runs

REPO = harness.REPO
SHAPES = REPO / "configs" / "gpu_check"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 50304}


def make_models(work: Path, tokenizer_dir: str, tiny: bool, device: torch.device) -> dict:
    """Random target and draft of the configured shapes, saved with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for role, name in (("target", "pythia-1.4b"), ("draft", "pythia-31m")):
        values = json.loads((SHAPES / f"{name}.json").read_text())
        if tiny:
            values.update(TINY, num_hidden_layers=3 if role == "target" else 2)
        config = AutoConfig.for_model(**values)
        torch.manual_seed(0 if role == "target" else 1)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        path = work / role
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[role] = {"path": str(path), "parameters": sum(p.numel() for p in model.parameters())}
        del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def cli(module: str, *args: str, env: dict | None = None) -> dict:
    """Run `python -m adaspec.cli.MODULE args` and time it; its output tail on failure."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", f"adaspec.cli.{module}", *args, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    out = {"seconds": time.perf_counter() - start, "returncode": done.returncode,
           "stdout_tail": done.stdout[-1500:]}
    if done.returncode:
        out["stderr_tail"] = done.stderr[-3000:]
        raise RuntimeError(f"adaspec.cli.{module} failed: {done.stderr.strip()[-500:]}")
    return out


def pipeline(work: Path, m: dict, rows: int, test_rows: int, batch_size: int) -> dict:
    cache = str(work / "cache")
    common = ["--cache", cache, "--task", "arith", "--target", m["target"]["path"]]
    steps: dict[str, dict] = {}
    steps["target_cache"] = cli("cache", "build", "--model", "target", *common,
                                "--limit", str(rows))
    steps["test_cache"] = cli("cache", "build", "--model", "target", *common, "--split", "test",
                              "--limit", str(test_rows), "--sparse", "topk", "--topk", "64",
                              "--value-encoding", "float16")
    train = [*common, "--draft", m["draft"]["path"], "--limit", str(rows), "--batch-size",
             str(batch_size), "--lr", "3e-4", "--epochs", "1"]
    steps["reference"] = cli("train", *train, "--stage", "ref", "--out", str(work / "ref"))
    steps["ref_cache"] = cli("cache", "build", "--model", "ref", *common[:4])
    # (into its own run folder: it used to train over the draft's initialisation in draft/)
    steps["adaspec_draft"] = cli("train", *train, "--k", "0.4", "--out", str(work / "adaspec"))
    steps["offline_eval"] = cli("eval", *common, "--split", "test", "--limit", str(test_rows),
                                "--modes", "offline", "--draft", str(work / "adaspec"),
                                "--json", str(work / "eval.json"))
    metrics = runs.training_metrics(work / "adaspec")
    tail = metrics[len(metrics) // 2:] or metrics  # past the warm-up
    steps["draft_training"] = {
        "steps": len(metrics),
        "step_seconds_median": sorted(b["elapsed"] - a["elapsed"] for a, b in
                                      zip(tail, tail[1:], strict=False))[len(tail) // 2 - 1]
        if len(tail) > 2 else None,
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in tail)[len(tail) // 2],
        "peak_gpu_memory_gb": max((r["peak_gpu_memory_gb"] for r in metrics
                                   if "peak_gpu_memory_gb" in r), default=None),
        "final_loss": metrics[-1]["loss"],
    }
    steps["offline_eval"]["result"] = json.loads((work / "eval.json").read_text())["offline"]
    return steps


def bf16_check(work: Path, m: dict) -> dict:
    """Fraction of the draft's weights that 8 AdamW steps at lr 1e-5 moved, bf16 vs fp32."""
    from safetensors.torch import load_file

    from adaspec.config import build_config
    from adaspec.train import train
    from cache_tools.store import CacheReader

    init = load_file(str(Path(m["draft"]["path"]) / "model.safetensors"))
    batches = -(-CacheReader(str(work / "cache"), "arith", "train").n_sequences // 8)
    out = {}
    for precision in ("bf16", "no"):
        cfg = build_config({
            "models": {"target": m["target"]["path"], "draft": m["draft"]["path"]},
            "data": {"task": "arith"},
            "cache": {"cache": str(work / "cache")},
            "train": {"k": 1.0, "lr": 1e-5, "batch_size": 8, "epochs": 8 / batches,
                      "mixed_precision": precision, "out": str(work / f"moved-{precision}")},
        })
        run = train(cfg, progress=False)  # 8 steps
        saved = load_file(str(runs.model_dir(run) / "model.safetensors"))
        moved = sum(int((saved[k].float() != init[k].float()).sum()) for k in saved)
        out[precision] = moved / sum(v.numel() for v in saved.values())
    out["bf16_moves_like_fp32"] = out["bf16"] >= 0.99 * out["no"]
    return out


def run_bench(module: str, args: list[str], out: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench.{module} failed: {done.stderr.strip()[-800:]}")
    return {"seconds": time.perf_counter() - start, "stdout": done.stdout[-3000:],
            "results": json.loads(out.read_text())}


def attempt(report: dict, name: str, fn, out: str) -> object:
    """Run one step of the check; a failure is recorded and the check goes on. The report so
    far is written after every step (a run cut short still leaves what it measured)."""
    start = time.perf_counter()
    try:
        value = fn()
        report[name] = value
        print(f"[ok] {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    except Exception as err:  # every step reports, whatever broke
        value = None
        report[name] = {"error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc()[-2000:]}
        print(f"[FAILED] {name}: {str(err)[:300]}", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2, default=float) + "\n")
    return value


def summary(report: dict) -> list[list]:
    draft = (report.get("pipeline") or {}).get("draft_training", {})
    split = ((report.get("stream") or {}).get("results") or {}).get("step_split", {})
    bf16 = report.get("bf16_vs_fp32") or {}
    return [
        ["draft step time (s), training run", draft.get("step_seconds_median")],
        ["draft step time (s), step split", split.get("step_seconds")],
        ["share of the step waiting on data", split.get("share_waiting_on_data")],
        ["label tokens/s, training run", draft.get("tokens_per_s_median")],
        ["label tokens/s, step split", split.get("label_tokens_per_s")],
        ["peak GPU memory (GB), training run", draft.get("peak_gpu_memory_gb")],
        ["weights moved, bf16 autocast", bf16.get("bf16")],
        ["weights moved, fp32", bf16.get("no")],
        ["bf16 moves weights as fp32 does", str(bf16.get("bf16_moves_like_fp32"))],
    ]


def main(argv: list[str] | None = None) -> int:
    p = harness.parser("gpu_check", __doc__, data=False)
    p.add_argument("--work", default="/tmp/adaspec-gpu-check")
    p.add_argument("--tokenizer", default=str(REPO / ".gpu" / "tokenizer"))
    p.add_argument("--rows", type=int, default=1800, help="arith training rows")
    p.add_argument("--test-rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run)")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (smoke test)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)")
        return 0
    machine = harness.start(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "gpu_check", "machine": machine, "settings": vars(args)}
    started = time.perf_counter()
    m = attempt(report, "models", lambda: make_models(work, args.tokenizer, args.tiny, device),
                args.out)
    if m:
        attempt(report, "pipeline", lambda: pipeline(work, m, args.rows, args.test_rows,
                                                      args.batch_size), args.out)
        attempt(report, "bf16_vs_fp32", lambda: bf16_check(work, m), args.out)
        quick = ["--batches", "200", "--steps", "3"] if args.tiny else ["--steps", "20"]
        attempt(report, "stream", lambda: run_bench(
            "stream", ["--cache", str(work / "cache"), "--task", "arith", "--draft",
                       m["draft"]["path"], "--device", device.type, "--step-batch-size",
                       str(args.batch_size), *quick], work / "stream.json"), args.out)
        attempt(report, "train_step", lambda: run_bench(
            "train_step", ["--target", m["target"]["path"], "--draft", m["draft"]["path"],
                           "--task", "arith", "--data-files", "", "--limit", "64",
                           "--batch-size", "4", "--steps", "3", "--rounds", "1", "--scales",
                           "1" if args.tiny else "1,10", "--rss-steps", "2"],
            work / "train_step.json"), args.out)
    report["seconds"] = time.perf_counter() - started
    print(harness.format_table(["GPU check", "value"],
                               [[k, "-" if v is None else v] for k, v in summary(report)]))
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    report["failed_steps"] = failed
    harness.write_json(args.out, report)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
