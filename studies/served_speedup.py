"""A converged draft, timed end to end: one draft trained until its validation agreement stops
rising, then the same draft, prompts and lengths timed on every path a user has (issue 28).

Setup, as `make demo` makes it (Makefile, configs/demo.yaml), with more data and steps: the
embedded target (SmolLM2-135M-Instruct with its chat template) on the offline arith task; the
cache holds the target's own greedy responses to `--train-rows` training prompts; validation
continuations of `--val-rows` prompts and test continuations of the `--prompts` timed prompts
(greedy, top-64 float16). The draft is the demo's: the target's first 2 layers with a head over
the `--draft-vocab` ids the target uses most, trained by plain KD (k = 1, the reference stage:
what won the decisive study, docs/converged_study.md) at a constant learning rate.

Training to a plateau: the run is trained `--chunk-epochs` at a time, each chunk extending the
same run (`train(cfg, resume=True)` with more epochs; constant rate: the same training
continued), and after each chunk `adaspec.validation.plateau` (mean validation greedy agreement
of the last quarter of steps minus the quarter before, < 0.5 pt) decides: stop, or extend, up
to `--max-epochs`. The curve and the decision after every chunk are recorded.

Paths, greedy, the same draft (its best model by validation greedy agreement), prompts and
max new tokens; each against its own target-only decoding, in interleaved rounds (order rotated
per round and prompt), medians of per-round speedups with min-max spreads; every output checked
identical to target-only decoding:

- `ours`: adaspec's decoder (`speculative.speculative_generate`) at the gamma the measured step
  costs predict fastest (`--gamma auto`: `speculative_timing.plan_gammas`), against
  `speculative.target_generate`;
- `assisted`: transformers' assisted generation (`target.generate(assistant_model=draft)`, a
  constant gamma drafted per step, as bench/speculative.py runs it) against `target.generate`;
- `llamacpp`: llama.cpp (bench/llamacpp_check.sh on the GGUF export); identity against its own
  output with a perfect draft (its batched verification differs numerically from its
  single-token decoding);
- `vllm`: vLLM's CPU build (bench/vllm_check.sh on the export).

Each path's predicted speedup beside the measured one: E[1 + A] from its per-position
acceptance over g c + v(g), with c (draft step / target step) and v(g) (verifying g + 1 tokens /
one target step) measured for that path.

    python -m studies.served_speedup --train-only --progress    # caches and training (niced)
    quiet-run python -m studies.served_speedup --paths ours,assisted   # time (after training)
    python -m studies.served_speedup --report-only              # doc + PNG from the JSON

Work goes to --work and is reused: finished caches, the run (a killed one resumes), each path's
timing (`--retime` times a path again).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import harness
from adaspec import runs, speedup
from adaspec.build import build_stage
from adaspec.config import Config, build_config
from adaspec.experiment import continuations_config, ensure_tuned_target, split_config
from adaspec.train import train
from adaspec.validation import plateau, validation_records

METRIC = "greedy_agreement"  # on the validation continuations: what greedy decoding accepts
BIN = Path(sys.executable).parent  # the project's virtualenv: its adaspec-export
PATHS = ("ours", "assisted", "llamacpp", "vllm")
PATH_NAMES = {"ours": "adaspec's decoder", "assisted": "transformers assisted generation",
              "llamacpp": "llama.cpp", "vllm": "vLLM CPU"}


# ---------------------------------------------------------------------------------------------
# Configs


def base_config(args, work: Path, epochs: float, target: str | None = None) -> Config:
    """The demo's settings (configs/demo.yaml) with this study's rows, lengths and epochs, for
    `target` (default: the fine-tuned target, `args.tuned_target`, once it exists)."""
    return build_config({
        "models": {"target": target or getattr(args, "tuned_target", None) or args.target,
                   "draft": args.draft},
        "data": {"task": args.task, "max_length": 256, "chat_template": not args.raw_prompts,
                 "limit": args.train_rows},
        "cache": {"cache": str(work / "cache"), "batch_tokens": 4096, "shard_rows": 4096,
                  "chunk_rows": 1024, "generate": True, "gen_temperature": 0.0,
                  "gen_max_new_tokens": args.response_tokens},
        "train": {"stage": "ref", "k": 1.0, "loss": "fkl", "epochs": epochs,
                  "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": "constant",
                  "weight_decay": 0.1, "draft_vocab": args.draft_vocab or None,
                  "eval_split": "validation", "eval_cache": str(work / "continuations"),
                  "eval_every": args.eval_every, "keep_best": True, "best_metric": METRIC,
                  "checkpoint_every": args.eval_every * 5, "out": str(work / "draft")},
        "eval": {"gamma": "auto", "max_gamma": args.max_gamma,
                 "max_new_tokens": args.max_new_tokens, "prompts": args.prompts},
    })


def ensure_caches(args, cfg: Config, work: Path) -> None:
    """Training responses (the default sampled cache), then the target's greedy continuations
    of the validation and test prompts (top-64 float16), as the demo builds them."""
    build_stage(cfg, "target", progress=args.progress)
    for split, rows in (("validation", args.val_rows), ("test", args.prompts)):
        build_stage(continuations_config(cfg, split, rows, str(work / "continuations"),
                                         args.cont_tokens), "target", progress=args.progress)


# ---------------------------------------------------------------------------------------------
# Training to a plateau


def next_chunk(curve: list[dict], epochs_done: float, chunk: float, max_epochs: float,
               metric: str = METRIC) -> dict:
    """After a chunk of training: stop at a plateau (`validation.plateau`, mean-based), stop at
    the cap, or extend by `chunk` epochs (never past `max_epochs`). Returns {"action": "plateau"
    | "cap" | "extend", "epochs": the run's length after the decision, "plateau": the check}."""
    check = plateau(curve, metric)
    if check["reached"]:
        return {"action": "plateau", "epochs": epochs_done, "plateau": check}
    if epochs_done >= max_epochs:
        return {"action": "cap", "epochs": epochs_done, "plateau": check}
    return {"action": "extend", "epochs": min(max_epochs, epochs_done + chunk), "plateau": check}


def run_epochs_done(run: Path) -> float:
    """The epochs a run has finished (`runs.is_finished`: a run killed mid-extension has
    finished only the chunk before, whose length is not needed, so 0 then too)."""
    return float(runs.read_schedule(run)["epochs"]) if runs.is_finished(run) else 0.0


def run_epochs_planned(run: Path) -> float:
    """The epochs the run was last asked for (0: no run yet)."""
    if runs.is_run_folder(run):
        return float(runs.read_schedule(run)["epochs"])
    return 0.0


def ensure_draft(args, work: Path, on_chunk=None) -> dict:
    """Train (or resume, or extend) the draft chunk by chunk until `next_chunk` stops; returns
    the training record (chunks with their decisions, curve, plateau, steps, seconds), and
    hands it to `on_chunk` after every chunk (partial results: a session may end mid-run)."""
    run = work / "draft"
    log_path = work / "chunks.json"
    chunks = json.loads(log_path.read_text()) if log_path.is_file() else []
    chunks = [c for i, c in enumerate(chunks)  # one entry per chunk (a re-run re-decides it)
              if not any(d["epochs"] == c["epochs"] and d["action"] == c["action"]
                         for d in chunks[:i])]
    epochs = run_epochs_planned(run) or args.chunk_epochs
    while True:
        if run_epochs_done(run) < epochs and args.no_train:
            curve = validation_records(run)  # stopped by the time budget, mid-chunk perhaps
            check = plateau(curve, METRIC)
            chunks = [c for c in chunks if c["action"] != "stopped"]
            chunks.append({"epochs": epochs, "steps": max((r["step"] for r in curve), default=0),
                           "action": "plateau" if check["reached"] else "stopped",
                           "plateau": check})
            log_path.write_text(json.dumps(chunks, indent=1))
            break
        if run_epochs_done(run) < epochs:
            cfg = base_config(args, work, epochs)
            train(cfg, resume=runs.latest_checkpoint(run) is not None, progress=args.progress)
        curve = validation_records(run)
        decision = next_chunk(curve, epochs, args.chunk_epochs, args.max_epochs)
        entry = {"epochs": epochs, "steps": max((r["step"] for r in curve), default=0),
                 "action": decision["action"], "plateau": decision["plateau"]}
        if entry["action"] == "extend":  # a cap raised since (--max-epochs): extended after all
            chunks = [c for c in chunks if not (c["epochs"] == epochs and c["action"] == "cap")]
        if not any(c["epochs"] == epochs and c["action"] != "stopped" for c in chunks):
            chunks.append(entry)
            log_path.write_text(json.dumps(chunks, indent=1))
        if on_chunk is not None:
            on_chunk(train_record(run, chunks))
        if decision["action"] != "extend":
            break
        epochs = decision["epochs"]
    return train_record(run, chunks)


def train_record(run: Path, chunks: list[dict]) -> dict:
    curve = validation_records(run)
    metrics = runs.training_metrics(run)
    return {"run": str(run), "schedule": runs.read_schedule(run), "validation": curve,
            "chunks": chunks, "best": runs.read_best(run), "plateau": plateau(curve, METRIC),
            "outcome": chunks[-1]["action"] if chunks else None,
            "steps_done": metrics[-1]["step"] if metrics else 0,
            "seconds": max((r.get("elapsed", 0.0) for r in metrics), default=None)}


# ---------------------------------------------------------------------------------------------
# Timing: adaspec's decoder and transformers' assisted generation, in one process


def time_local(args, cfg: Config, draft_dir: Path, paths: list[str]) -> dict:
    """`ours` and/or `assisted` (see the module docstring): one target and draft load (for
    `ours` also a copy of each with every linear prepacked for oneDNN, as adaspec-eval decodes
    on the CPU: adaspec/cpu_decoding.py; transformers' path runs the models as loaded), the
    target-only outputs first (untimed), costs and gamma, one untimed warm-up per decoding, then
    `--rounds` rounds, each prompt through every decoding back to back in rotated order."""
    from adaspec import speculative
    from adaspec.speculative_timing import plan_gammas, speculative_counts

    m = load_local(args, cfg, draft_dir, packed="ours" in paths)
    target, draft = m.packed if m.packed else (m.target, m.draft)  # ours' costs, as it runs
    decode = ([draft], target, m.prompts, m.vocab, m.eos)
    rest = (0.0, args.max_new_tokens, 0)
    s = SimpleNamespace(gamma="auto", max_gamma=args.max_gamma, speed=True)
    costs, choice = plan_gammas(s, decode, rest, args.progress)  # pilot at max_gamma: P(A >= i)
    gamma = choice[0]["gamma"]
    counts = speculative_counts(*decode, gamma, *rest, progress=args.progress)[0]
    decoders = local_decoders(m, paths, gamma, args.max_new_tokens)
    expected = [speculative.target_generate(m.target, p, args.max_new_tokens,
                                            eos_token_id=m.eos, vocab_size=m.vocab).tolist()
                for p in m.prompts]
    names = list(decoders)

    def checked(name: str, i: int) -> tuple[int, float]:
        started = time.perf_counter()
        out = decoders[name](i)
        took = time.perf_counter() - started
        if out != expected[i]:
            at = next((k for k, (a, b) in enumerate(zip(out, expected[i], strict=False))
                       if a != b), min(len(out), len(expected[i])))
            raise RuntimeError(f"prompt {i}: {name} differs from target-only greedy decoding at "
                               f"token {at} ({len(out)} vs {len(expected[i])} tokens)")
        return len(out), took

    for name in names:  # untimed: first calls pay for allocations and lazy init
        checked(name, 0)
    tokens, seconds = interleaved_rounds(lambda name, i, r: checked(name, i), names,
                                         len(m.prompts), args.rounds, args.progress,
                                         "timed rounds")
    timing = {"tokens": tokens, "seconds": seconds, "rounds": args.rounds,
              "new_tokens": [len(e) for e in expected], "prepacked_linears": m.prepacked}
    path_costs = {"ours": costs[0], "assisted": costs[0]}
    if "assisted" in paths and m.packed:  # generate() runs the models as loaded
        path_costs["assisted"] = speculative.step_costs(m.target, m.draft, m.prompts[0],
                                                        args.max_gamma, vocab_size=m.vocab)
    return local_results(paths, timing, counts, path_costs, choice[0], gamma)


def load_local(args, cfg: Config, draft_dir: Path, packed: bool) -> SimpleNamespace:
    """The target and the draft as loaded (float32, CPU), with `packed` also prepacked copies
    (None where oneDNN is not available), the test prompts and the decoding ids."""
    import torch

    from adaspec import cpu_decoding, models
    from adaspec.evaluate import split_prompts

    target, tokenizer = models.load_frozen(cfg.models.target, torch.float32, "cpu")
    draft, _ = models.load_frozen(str(draft_dir), torch.float32, "cpu")
    pair, prepacked = None, 0
    if packed and cpu_decoding.available(target) and cpu_decoding.available(draft):
        pair = (copy.deepcopy(target), copy.deepcopy(draft))  # generate() keeps the originals
        prepacked = sum(cpu_decoding.prepack_linears(x) for x in pair)
    draft.generation_config.num_assistant_tokens_schedule = "constant"  # as bench/speculative
    draft.generation_config.assistant_confidence_threshold = 0.0
    prompts = split_prompts(split_config(cfg, "test", args.prompts), tokenizer, args.prompts)
    return SimpleNamespace(target=target, draft=draft, packed=pair, prepacked=prepacked,
                           prompts=prompts, vocab=models.real_vocab_size(tokenizer),
                           eos=tokenizer.eos_token_id, pad=models.pad_id(tokenizer))


def local_decoders(m: SimpleNamespace, paths: list[str], gamma: int, new_tokens: int) -> dict:
    """Each path's decoding and its target-only baseline, by prompt index -> generated ids."""
    import torch

    from adaspec import speculative

    target, draft = m.packed if m.packed else (m.target, m.draft)
    m.draft.generation_config.num_assistant_tokens = gamma

    def hf(i: int, assistant) -> list[int]:
        ids = m.prompts[i]
        extra = {"assistant_model": assistant} if assistant is not None else {}
        out = m.target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, eos_token_id=m.eos,
                                pad_token_id=m.pad, **extra)
        return out[0, ids.shape[1]:].tolist()

    decoders = {}
    if "ours" in paths:
        decoders["ours target"] = lambda i: speculative.target_generate(
            target, m.prompts[i], new_tokens, eos_token_id=m.eos, vocab_size=m.vocab).tolist()
        decoders["ours"] = lambda i: speculative.speculative_generate(
            target, draft, m.prompts[i], new_tokens, gamma, eos_token_id=m.eos,
            vocab_size=m.vocab)[0].tolist()
    if "assisted" in paths:
        decoders["assisted target"] = lambda i: hf(i, None)
        decoders["assisted"] = lambda i: hf(i, m.draft)
    return decoders


def local_results(paths: list[str], timing: dict, counts: dict, path_costs: dict,
                  choice: dict, gamma: int) -> dict:
    """Each in-process path's result (speed, prediction, costs, counts) from its rounds."""
    from adaspec.statistics import summarize_speed

    tokens, seconds = timing["tokens"], timing["seconds"]
    n = len(timing["new_tokens"])
    out = {}
    for path in paths:
        speed = summarize_speed(tokens[path], seconds[path], tokens[f"{path} target"],
                                seconds[f"{path} target"])
        c = path_costs[path]
        out[path] = path_result(
            speed, speedup.expected_tokens(counts["at_least"], gamma), c["draft_cost"],
            c["verify_cost"], gamma,
            identical={"prompts": n, "identical": n,
                       "against": "adaspec's target-only greedy decoding"},
            extra={"at_least": counts["at_least"],
                   "counts": {k: v for k, v in counts.items() if k != "per_prompt"},
                   "costs": c, "gamma_auto": choice, "tokens": tokens[path],
                   "seconds": seconds[path], "target_tokens": tokens[f"{path} target"],
                   "target_seconds": seconds[f"{path} target"], "rounds": timing["rounds"],
                   "new_tokens": timing["new_tokens"],
                   "prepacked_linears": timing["prepacked_linears"] if path == "ours" else 0})
    if "assisted" in out:
        out["assisted"]["note"] = (
            "acceptance from adaspec's decoder at the same gamma (greedy: the same draft proposes "
            "the same tokens); c and v are the same models' forward costs as generate() runs "
            "them (not prepacked), so the prediction leaves out generate()'s own per-step work")
    return out


def interleaved_rounds(run_one, names: list[str], n_prompts: int, rounds: int, progress: bool,
                       desc: str) -> tuple[dict, dict]:
    """`rounds` rounds, each prompt through every decoding back to back, the order rotated per
    round and prompt; `run_one(name, prompt_index, round)` -> (tokens, seconds). Returns the
    tokens and seconds per decoding and round."""
    from tqdm.auto import tqdm

    tokens = {n: [0] * rounds for n in names}
    seconds = {n: [0.0] * rounds for n in names}
    bar = tqdm(total=rounds * n_prompts, desc=desc, disable=not progress, dynamic_ncols=True)
    for r in range(rounds):
        for i in range(n_prompts):
            for name in harness.rotated(names, r + i):
                n, took = run_one(name, i, r)
                tokens[name][r] += n
                seconds[name][r] += took
            bar.update()
    bar.close()
    return tokens, seconds


# ---------------------------------------------------------------------------------------------
# Summary math


def path_result(speed: dict, tokens_per_step: float, c: float, v: dict, gamma: int,
                identical: dict, extra: dict | None = None) -> dict:
    """One path's measured speedup (median of per-round ratios, min-max) with the prediction
    from its tokens per step (E[1 + A]: from its per-position acceptance where the path
    reports it) and step costs beside it: E[1 + A] / (g c + v(g))."""
    v = {int(g): x for g, x in v.items()}
    step = speedup.step_cost(gamma, c, v)
    predicted = tokens_per_step / step
    measured = speed["speedup"]
    return {"speedup": measured, "speedup_min": speed["speedup_min"],
            "speedup_max": speed["speedup_max"], "tokens_per_s": speed["speculative_tokens_per_s"],
            "target_tokens_per_s": speed["target_tokens_per_s"],
            "predicted_speedup": predicted,
            "predicted_minus_measured_rel": (predicted - measured) / measured,
            "gamma": gamma, "c": c, "v": v[gamma], "verify_cost": v,
            "accepted_length": tokens_per_step, "step_cost": step,
            "break_even": break_even(tokens_per_step, c, v, gamma),
            "identical": identical, **(extra or {})}


def break_even(tokens: float, c: float, v: dict, gamma: int) -> dict:
    """What would change the sign (or reach the next mark), in this path's own numbers: the
    accepted length a step of this cost needs for 1.0x, 1.5x and 2.0x, and the draft cost c or
    verification cost v at which the measured tokens per step reach each."""
    step = speedup.step_cost(gamma, c, v)
    out = {}
    for goal in (1.0, 1.5, 2.0):
        budget = tokens / goal  # the step cost at which this acceptance gives `goal`
        out[f"{goal:g}x"] = {"accepted_length_needed": goal * step,
                             "c_needed": (budget - v[gamma]) / gamma,
                             "v_needed": budget - gamma * c}
    return out


# ---------------------------------------------------------------------------------------------
# Engines: the export, vLLM (bench/vllm_check's pieces), llama.cpp (bench/llamacpp_check.sh)


def ensure_export(args, work: Path, fmt: str = "hf") -> Path:
    """The draft's best model exported for engines (`adaspec-export --best`): a full-vocabulary
    head (engines have no token map for a plain draft), rows padded to the target's."""
    out = work / ("export" if fmt == "hf" else f"export-gguf-{args.gguf_type}")
    best = json.dumps(runs.read_best(work / "draft"), sort_keys=True)
    stamp = out.with_name(out.name + ".best.json")  # the best model it was exported from
    exported = (out / "config.json").is_file() or any(out.glob("*.gguf"))
    if exported and stamp.is_file() and stamp.read_text() == best:
        return out
    command = [str(BIN / "adaspec-export"), str(work / "draft"), "--best", "--out", str(out),
               "--overwrite", "--format", fmt]
    if fmt == "gguf":
        command += ["--gguf-type", args.gguf_type]
    if args.tuned_target != "smollm2-135m":
        command += ["--target", args.tuned_target]
    subprocess.run(command, check=True)
    stamp.write_text(best)
    return out


def engine_costs(args, cfg: Config, export: Path) -> dict:
    """c and v(g) of the exported (full-head) draft with the target, timed by adaspec's forwards
    (`speculative.step_costs`): the same float32 weights an engine runs, not the engine's own
    kernels."""
    import torch

    from adaspec import models, speculative
    from adaspec.evaluate import split_prompts

    target, tokenizer = models.load_frozen(cfg.models.target, torch.float32, "cpu")
    draft, _ = models.load_frozen(str(export), torch.float32, "cpu")
    prompt = split_prompts(split_config(cfg, "test", 1), tokenizer, 1)[0]
    return speculative.step_costs(target, draft, prompt, args.max_gamma,
                                  vocab_size=models.real_vocab_size(tokenizer))


def time_vllm(args, cfg: Config, work: Path, gamma: int) -> dict:
    """bench/vllm_check.sh's three steps with this study's export, prompts and lengths (its
    prepare.py, engine.py in vLLM's virtualenv, merge.py), then this path's result at batch 1."""
    venv = Path(args.vllm_venv)
    if not (venv / ".adaspec-vllm-installed").is_file():
        raise RuntimeError(f"no vLLM virtualenv at {venv}: VLLM_VENV={venv} "
                           "bench/vllm_check.sh --setup-only")
    export = ensure_export(args, work)
    folder = work / "vllm"
    env = {**os.environ, "PYTHONPATH": str(harness.REPO),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    common = ["--max-new-tokens", str(args.max_new_tokens), "--gamma", str(gamma)]
    rounds = str(args.vllm_rounds or args.rounds)
    subprocess.run([str(BIN / "python"), "bench/vllm_check/prepare.py", "--export", str(export),
                    "--target", cfg.models.target, "--task", args.task, "--prompts",
                    str(args.prompts), "--work", str(folder), *common], check=True,
                   cwd=harness.REPO, env=env)
    raw = folder / "vllm_raw.json"
    subprocess.run([str(venv / "bin" / "python"), "bench/vllm_check/engine.py", "--target",
                    str(folder / "target"), "--draft", str(export), "--prompts",
                    str(folder / "prompts.json"), "--rounds", rounds, "--out",
                    str(raw), *common, *(["--eager"] if args.vllm_eager else [])],
                   check=True, cwd=harness.REPO, env={**env, "PYTHONPATH": ""})
    merged = folder / "vllm.json"
    subprocess.run([str(BIN / "python"), "bench/vllm_check/merge.py", "--prompts",
                    str(folder / "prompts.json"), "--adaspec", str(folder / "adaspec.json"),
                    "--vllm", str(raw), "--out", str(merged)], check=True, cwd=harness.REPO,
                   env=env)
    return vllm_result(json.loads(merged.read_text()), gamma, engine_costs(args, cfg, export))


def vllm_result(merged: dict, gamma: int, costs: dict) -> dict:
    """This path's result from bench/vllm_check's merged JSON (batch 1: one prompt at a time,
    as the other paths decode)."""
    b = merged["batches"]["1"]
    counts = b["vllm_spec_decode"]
    drafts = counts["num_drafts"]
    at_least = [a / drafts if drafts else math.nan for a in counts["num_accepted_tokens_per_pos"]]
    speed = b["speed"]
    return path_result(
        speed, speedup.expected_tokens(at_least, gamma), costs["draft_cost"],
        costs["verify_cost"], gamma,
        identical={"prompts": b["prompts"],
                   "identical": b["identical"]["vllm_speculative_vs_vllm_target"],
                   "against": "vLLM's own target-only greedy decoding",
                   "vllm_target_vs_adaspec_target":
                       b["identical"]["vllm_target_vs_adaspec_target"]},
        extra={"costs": costs, "costs_from": "adaspec's forwards of the exported full-head "
               "draft and the target (float32, the weights vLLM runs)",
               "at_least": at_least, "counts": counts,
               "vllm_mean_accepted_length": b["vllm_mean_accepted_length"],
               "batch_n": {k: merged["batches"][k]["speed"] for k in merged["batches"]
                           if k != "1"},
               "engine": merged["settings"].get("engine"),
               "vllm_versions": merged["machine"].get("vllm_side"),
               "check": merged["check"], "seconds": merged["seconds"]})


def llamacpp_bin() -> Path:
    """llama.cpp's binaries, built (once, cached) by bench/llamacpp_check.sh --build-only."""
    done = subprocess.run(["bash", str(harness.REPO / "bench" / "llamacpp_check.sh"),
                           "--build-only"], check=True, capture_output=True, text=True,
                          cwd=harness.REPO)
    line = [x for x in done.stdout.splitlines() if x.startswith("llama.cpp built in ")]
    if not line:
        raise RuntimeError(f"bench/llamacpp_check.sh --build-only said: {done.stdout[-300:]}")
    return Path(line[-1].removeprefix("llama.cpp built in ").strip())


SPEC_LINE = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
EVAL_LINE = re.compile(r"\beval time =\s+([\d.]+) ms /\s+(\d+) (?:runs|tokens)")


def parse_speculative(stderr: str) -> dict:
    """llama-speculative-simple's own counts: tokens decoded and seconds (prompt and loading
    left out), drafted and accepted; steps = tokens - accepted (a step emits its accepted
    drafts plus one token of the target's)."""
    m = SPEC_LINE.search(stderr)
    counts = {k: int(re.search(rf"{k}\s+=\s+(\d+)", stderr).group(1))
              for k in ("n_predict", "n_drafted", "n_accept")}
    if m is None:
        raise RuntimeError("llama-speculative-simple printed no 'decoded ... tokens' line")
    return {"tokens": int(m.group(1)), "seconds": float(m.group(2)), **counts,
            "steps": counts["n_predict"] - counts["n_accept"]}


def parse_completion(stderr: str) -> dict:
    """llama-completion's decoding time (`eval time`: the tokens after the first; prompt
    evaluation and loading left out)."""
    found = [m for m in EVAL_LINE.finditer(stderr) if "prompt eval" not in
             stderr[max(0, m.start() - 8):m.start()]]
    if not found:
        raise RuntimeError("llama-completion printed no 'eval time' line")
    ms, runs_ = float(found[-1].group(1)), int(found[-1].group(2))
    return {"tokens": runs_, "seconds": ms / 1000.0}


def llamacpp_costs(bin_dir: Path, target: Path, draft: Path, max_gamma: int, threads: int
                   ) -> dict:
    """c and v(g) in llama.cpp's own kernels (llama-bench, one thread setting): c = the draft's
    time per generated token over the target's; v(g) = the target's time to process g + 1
    tokens in one batch over its time per generated token."""
    sizes = ",".join(str(g + 1) for g in range(1, max_gamma + 1))
    done = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(target), "-m", str(draft),
                           "-p", sizes, "-n", "32", "-r", "5", "-t", str(threads), "-o", "json"],
                          check=True, capture_output=True, text=True)
    rows = json.loads(done.stdout)
    per = {}
    for r in rows:  # avg_ns: the mean time of the whole test (n_prompt or n_gen tokens)
        model = "target" if Path(r["model_filename"]) == target else "draft"
        n = r["n_prompt"] or r["n_gen"]
        kind = "pp" if r["n_prompt"] else "tg"
        per[model, kind, n] = r["avg_ns"] / 1e9
    t_tok = per["target", "tg", 32] / 32
    d_tok = per["draft", "tg", 32] / 32
    return {"target_step_s": t_tok, "draft_step_s": d_tok, "draft_cost": d_tok / t_tok,
            "verify_cost": {g: per["target", "pp", g + 1] / t_tok
                            for g in range(1, max_gamma + 1)},
            "timing": "llama-bench, 5 repetitions, mean"}


def ensure_target_gguf(args, work: Path) -> Path:
    """The target as llama.cpp runs it: the embedded GGUF (Q4_1, as the package ships it), or
    the fine-tuned target exported to GGUF (`adaspec-export --format gguf`) at the draft's type
    (`--gguf-type`): our exporter quantizes every matrix alike, embeddings and head included,
    and with the target at Q4_1 the draft's accepted length fell to 1.25 (4.4 in adaspec's
    decoder; 4.0 with the target at q8_0)."""
    from adaspec import models

    if args.tuned_target == models.DEFAULT_ALIAS:
        return models.smollm2_gguf_path()
    out = work / f"target-gguf-{args.gguf_type}"
    if not any(out.glob("*.gguf")):
        subprocess.run([str(BIN / "adaspec-export"), str(work / "target"), "--out", str(out),
                        "--overwrite", "--format", "gguf", "--gguf-type", args.gguf_type],
                       check=True)
    return next(out.glob("*.gguf"))


def time_llamacpp(args, cfg: Config, work: Path, gamma: int) -> dict:
    """llama.cpp (binaries from bench/llamacpp_check.sh): the target's GGUF (`ensure_target_gguf`:
    the embedded Q4_1 one, or the fine-tuned target exported) alone (`llama-completion`), with
    the exported draft
    (`--format gguf --gguf-type`, `llama-speculative-simple --spec-type draft-simple`, gamma
    drafts per step, no confidence cut-off) and with itself as a perfect draft (the identity
    reference: llama.cpp's batched verification differs numerically from its one-token
    decoding). The same prompts, rendered with the chat template as text (llama.cpp tokenizes
    them), the same --max-new-tokens; rounds interleaved, order rotated."""
    from adaspec import models
    from adaspec.evaluate import split_prompts

    if args.target != models.DEFAULT_ALIAS:
        raise RuntimeError("llama.cpp path: only the embedded target (its GGUF) is wired")
    bin_dir = llamacpp_bin()
    target = ensure_target_gguf(args, work)
    draft_dir = ensure_export(args, work, "gguf")
    draft = next(draft_dir.glob("*.gguf"))
    folder = work / "llamacpp"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(args.target)
    files = []
    for i, ids in enumerate(split_prompts(split_config(cfg, "test", args.prompts), tokenizer,
                                          args.prompts)):
        f = folder / f"prompt-{i}.txt"
        f.write_text(tokenizer.decode(ids[0].tolist()))
        files.append(f)
    t = str(args.threads or 2)
    common = ["-n", str(args.max_new_tokens), "--temp", "0", "-t", t, "-c", "1024", "-f"]

    def completion(f: Path) -> tuple[dict, str]:
        done = subprocess.run([str(bin_dir / "llama-completion"), "-m", str(target), *common,
                               str(f), "-no-cnv", "--simple-io"], check=True,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return parse_completion(done.stderr), done.stdout

    def speculative_run(f: Path, with_draft: Path) -> tuple[dict, str]:
        done = subprocess.run([str(bin_dir / "llama-speculative-simple"), "-m", str(target),
                               "-md", str(with_draft), "--spec-type", "draft-simple",
                               "--spec-draft-n-max", str(gamma), "--spec-draft-p-min", "0",
                               "-td", t, *common, str(f)], check=True, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        return parse_speculative(done.stderr), done.stdout

    decoders = {"target": completion, "draft": lambda f: speculative_run(f, draft),
                "perfect": lambda f: speculative_run(f, target)}
    names = list(decoders)
    for name in names:  # untimed warm-up (page cache, first-run costs)
        decoders[name](files[0])
    texts: dict = {n: [None] * len(files) for n in names}
    counts = {"n_predict": 0, "n_drafted": 0, "n_accept": 0, "steps": 0}
    perfect = dict(counts)

    def run_one(name: str, i: int, r: int) -> tuple[int, float]:
        one, text = decoders[name](files[i])
        if r == 0:  # outputs and acceptance counts from the first round
            texts[name][i] = text
            (folder / f"output-{name}-{i}.txt").write_text(text)
            for k in counts:
                if name in ("draft", "perfect") and k in one:
                    (counts if name == "draft" else perfect)[k] += one[k]
        return one["tokens"], one["seconds"]

    tokens, seconds = interleaved_rounds(run_one, names, len(files), args.rounds, args.progress,
                                         "llama.cpp rounds")
    costs = llamacpp_costs(bin_dir, target, draft, args.max_gamma, int(t))
    files_info = {"gguf_type": args.gguf_type, "draft_bytes": draft.stat().st_size,
                  "target_bytes": target.stat().st_size, "target_gguf_type":
                  "Q4_1" if args.tuned_target == models.DEFAULT_ALIAS else args.gguf_type}
    return llamacpp_result(tokens, seconds, texts, counts, perfect, costs, gamma, files_info)


def llamacpp_result(tokens: dict, seconds: dict, texts: dict, counts: dict, perfect: dict,
                    costs: dict, gamma: int, files_info: dict) -> dict:
    """The llama.cpp path's result from its rounds (see `time_llamacpp`)."""
    from adaspec.statistics import summarize_speed

    speed = summarize_speed(tokens["draft"], seconds["draft"], tokens["target"],
                            seconds["target"])
    perfect_speed = summarize_speed(tokens["perfect"], seconds["perfect"], tokens["target"],
                                    seconds["target"])
    same = [same_prefix(a, b) for a, b in zip(texts["draft"], texts["perfect"], strict=True)]
    same_target = [same_prefix(generated(a), generated(b))
                   for a, b in zip(texts["draft"], texts["target"], strict=True)]
    tokens_per_step = counts["n_predict"] / counts["steps"]
    return path_result(
        speed, tokens_per_step, costs["draft_cost"], costs["verify_cost"], gamma,
        identical={"prompts": len(same), "identical": sum(same),
                   "against": "llama.cpp's own output with a perfect draft (the target "
                              "drafting for itself), up to the shorter of the two",
                   "same_as_llama_completion": sum(same_target)},
        extra={"costs": costs, "counts": counts, "perfect_draft": {
                   "counts": perfect, "speedup": perfect_speed["speedup"],
                   "speedup_min": perfect_speed["speedup_min"],
                   "speedup_max": perfect_speed["speedup_max"]},
               **files_info, "tokens": tokens, "seconds": seconds,
               "note": "tokens per step from llama-speculative-simple's totals (steps = tokens "
                       "- accepted; it reports no per-position counts); c and v from "
                       "llama-bench; speeds from each tool's own decoding time (loading and "
                       "prompt left out)"})


def generated(printed: str) -> str:
    """The generated text of a printed output (llama-completion prints the prompt without its
    special tokens, llama-speculative-simple with them): what follows the last "assistant" line
    of the chat template."""
    return printed.rsplit("assistant\n", 1)[-1]


def same_prefix(a: str, b: str) -> bool:
    """Two printed outputs (prompt and generated text, then the tool's closing newlines) agree
    up to the shorter one (llama-speculative-simple stops after the step that passes -n, so
    lengths differ by up to gamma tokens)."""
    a, b = a.rstrip(), b.rstrip()
    n = min(len(a), len(b))
    return a[:n] == b[:n]


# ---------------------------------------------------------------------------------------------
# Results: per-path files in --work, the JSON, the doc and the chart


def targets(paths: dict) -> dict:
    """The issue's done-when figures against what was measured."""
    measured = {k: v for k, v in paths.items() if v.get("measured", True) and "speedup" in v}
    ours = measured.get("ours")
    engines = {k: v["speedup"] for k, v in measured.items() if k in ("llamacpp", "vllm")}
    within = {k: abs(v["predicted_minus_measured_rel"]) <= 0.15 for k, v in measured.items()}
    return {
        "ours_at_least_2x": None if ours is None else ours["speedup"] >= 2.0,
        "ours_spread_above_1.5": None if ours is None else ours["speedup_min"] > 1.5,
        "an_engine_at_least_1.5x": (None if not engines
                                    else any(v >= 1.5 for v in engines.values())),
        "engines_measured": sorted(engines),
        "predicted_within_15pct": within,
        "identical_everywhere": (None if not measured else all(
            v["identical"]["identical"] == v["identical"]["prompts"] for v in measured.values())),
    }


def markdown(payload: dict, plot_name: str) -> str:
    lines = (_intro_lines(payload) + _training_lines(payload["training"])
             + _path_lines(payload) + _needs_lines(payload))
    analysis = payload.get("analysis") or []
    if analysis:
        lines += ["## Why", ""] + [f"- {x}" for x in analysis] + [""]
    lines += _target_lines(payload)
    notes = payload["settings"].get("note") or []
    if notes:
        lines += ["## Notes on this run", ""] + [f"- {n}" for n in notes] + [""]
    lines += [f"![speedup per path]({plot_name})", ""]
    return "\n".join(lines)


def _intro_lines(payload: dict) -> list[str]:
    a, t = payload["settings"], payload["training"]
    tuned = (f"fine-tuned on the {a['train_rows']} training rows first (stage sft, lr "
             f"{a['sft_lr']}, {a['sft_epochs']:g} epoch{'s' if a['sft_epochs'] != 1 else ''}, "
             "the paper's first step, as docs/converged_study.md) "
             if a.get("sft_epochs") else "")
    lines = [
        "# A converged draft, timed end to end",
        "",
    ]
    if t.get("outcome") != "plateau":
        lines += [f"**Status: the draft timed here had not reached its plateau** (training "
                  f"{t.get('outcome')} after {t.get('steps_done')} steps; see the notes at the "
                  "end): these are the numbers of a partly trained draft.", ""]
    lines += [
        f"Target {a['target']} {tuned}"
        f"({'raw prompts' if a['raw_prompts'] else 'chat template'}) on "
        f"{a['task']}, draft {a['draft']} with a {a['draft_vocab']}-id head (--draft-vocab), as "
        "`make demo` makes them, with more data and steps: the cache holds the target's own "
        f"greedy responses to {a['train_rows']} training prompts ({a['response_tokens']} new "
        f"tokens at most); validation on its greedy continuations ({a['cont_tokens']} tokens) of "
        f"{a['val_rows']} validation prompts; "
        f"{a['prompts']} test prompts timed, {a['max_new_tokens']} new tokens, greedy. Training: "
        f"plain KD (k = 1, the reference stage: what won the decisive study, "
        f"docs/converged_study.md), batch {a['batch_size']}, lr {a['lr']} constant, validated "
        f"every {a['eval_every']} steps, best model by validation greedy agreement kept and "
        f"timed; extended {a['chunk_epochs']:g} epochs at a time until the mean-based plateau "
        f"check (`adaspec.validation.plateau`) holds or {a['max_epochs']:g} epochs.",
        "",
        "`python -m studies.served_speedup` (studies/README.md); numbers from "
        "`studies/results/served_speedup.json`.",
        "",
    ]
    return lines


def _training_lines(t: dict) -> list[str]:
    lines = [
        "## Training to a plateau",
        "",
        "| epochs | optimizer steps | last-quarter mean minus the quarter before | decision |",
        "|---|---|---|---|",
    ]
    for c in t["chunks"]:
        change = c["plateau"]["change"]
        lines.append(f"| {c['epochs']:g} | {c['steps']} | "
                     f"{'-' if change is None else f'{change * 100:+.2f} pt'} | {c['action']} |")
    best = t.get("best") or {}
    p = t["plateau"]
    lines += ["", f"Outcome: **{t['outcome']}** after {t['steps_done']} steps"
              + (f" ({t['seconds'] / 60:.0f} min of training)" if t.get("seconds") else "")
              + f"; plateau reached: {'yes' if p['reached'] else 'no'}"
              + ("" if p["change"] is None else f" ({p['change'] * 100:+.2f} pt)")
              + (f"; best model at step {best.get('step')}, validation greedy agreement "
                 f"{best.get('greedy_agreement', math.nan):.4f}" if best else "") + ".", ""]
    return lines


def _path_lines(payload: dict) -> list[str]:
    lines = ["## Speedup per path", "",
              "Each path against its own target-only decoding, greedy, the same draft, prompts and "
              "lengths, rounds interleaved; speedup = median of per-round ratios (min-max). "
              "Predicted = E[1 + A] from the path's per-position acceptance over g c + v(g) from "
              "its step costs.", "",
              "| path | gamma | target-only tok/s | speculative tok/s | speedup (min-max) | "
              "predicted | predicted vs measured | c | v(g) | accepted length | identical |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    not_measured = []
    for name in PATHS:
        r = payload["paths"].get(name)
        if r is None or not r.get("measured", True):
            not_measured.append((name, (r or {}).get("reason", "not run")))
            continue
        ident = r["identical"]
        lines.append(
            f"| {PATH_NAMES[name]} | {r['gamma']} | {r['target_tokens_per_s']:.1f} | "
            f"{r['tokens_per_s']:.1f} | **{r['speedup']:.2f}x** ({r['speedup_min']:.2f}-"
            f"{r['speedup_max']:.2f}) | {r['predicted_speedup']:.2f}x | "
            f"{r['predicted_minus_measured_rel'] * 100:+.0f}% | {r['c']:.3f} | {r['v']:.2f} | "
            f"{r['accepted_length']:.2f} | {ident['identical']}/{ident['prompts']} |")
    for name, reason in not_measured:
        lines.append(f"| {PATH_NAMES[name]} | not measured: {reason} |  |  |  |  |  |  |  |  |  |")
    lines += [""]
    for name in PATHS:
        r = payload["paths"].get(name)
        if r and r.get("measured", True) and r.get("note"):
            lines += [f"{PATH_NAMES[name]}: {r['note']}.", ""]
    return lines


def _needs_lines(payload: dict) -> list[str]:
    lines = ["## What each path needs", "",
              "In each path's own numbers: the accepted length per step its step cost g c + v(g) "
              "needs for 1.0x / 1.5x / 2.0x, and the draft cost c (at this v) or verification "
              "cost v (at this c) with which its measured acceptance would give them (negative: "
              "out of reach by that lever alone).", "",
              "| path | step cost g c + v | accepted length | needs for 1.0x / 1.5x / 2.0x | "
              "c for 1.0x / 1.5x / 2.0x | v for 1.0x / 1.5x / 2.0x |", "|---|---|---|---|---|---|"]
    for name in PATHS:
        r = payload["paths"].get(name)
        if r is None or not r.get("measured", True):
            continue
        be = r["break_even"]
        goals = ("1x", "1.5x", "2x")
        lines.append(
            f"| {PATH_NAMES[name]} | {r['step_cost']:.2f} | {r['accepted_length']:.2f} | "
            + " / ".join(f"{be[g]['accepted_length_needed']:.2f}" for g in goals) + " | "
            + " / ".join(f"{be[g]['c_needed']:.3f}" for g in goals) + " | "
            + " / ".join(f"{be[g]['v_needed']:.2f}" for g in goals) + " |")
    return lines + [""]


def _target_lines(payload: dict) -> list[str]:
    s = payload["summary"]
    lines = ["## Against the issue's targets", "",
              f"- adaspec's decoder >= 2.0x: {yes(s['ours_at_least_2x'])}; its spread above "
              f"1.5: {yes(s['ours_spread_above_1.5'])}",
              f"- a real engine (vLLM CPU or llama.cpp) >= 1.5x: "
              f"{yes(s['an_engine_at_least_1.5x'])} (measured: "
              f"{', '.join(s['engines_measured']) or 'none'})",
              "- predicted within 15% of measured: " + (", ".join(
                  f"{PATH_NAMES[k]} {yes(v)}" for k, v in s["predicted_within_15pct"].items())
                  or "-"),
              f"- greedy outputs identical on every measured path: "
              f"{yes(s['identical_everywhere'])}", ""]
    loads = [f"{PATH_NAMES[k]} {other_cores(v):.2f}" for k, v in payload["paths"].items()
             if v.get("measured", True) and v.get("span") and k in ("ours", "assisted")]
    if loads:
        lines += ["Machine: " + payload["machine"].get("cpu", "?") + f", "
                  f"{payload['machine'].get('cores')} cores. Each path timed under `quiet-run` "
                  "(other niced jobs paused); cores used by other processes while the in-process "
                  "paths were timed: " + ", ".join(loads) + " (llama.cpp and vLLM run as the "
                  "study's child processes, which that counter cannot tell from other jobs).",
                  ""]
    return lines


def other_cores(result: dict) -> float:
    span = result["span"]
    return span["others_cpu_seconds"] / max(span["seconds"], 1e-9)


def yes(value) -> str:
    return "not measured" if value is None else ("yes" if value else "no")


def plot(payload: dict, path: Path) -> None:
    """Measured speedup per path with its min-max spread, the prediction beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(PATH_NAMES[k], payload["paths"][k]) for k in PATHS
            if k in payload["paths"] and payload["paths"][k].get("measured", True)]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = list(range(len(rows)))
    ax.bar(x, [r["speedup"] for _, r in rows], color="tab:blue", label="measured (median)")
    ax.errorbar(x, [r["speedup"] for _, r in rows],
                yerr=[[r["speedup"] - r["speedup_min"] for _, r in rows],
                      [r["speedup_max"] - r["speedup"] for _, r in rows]],
                fmt="none", ecolor="k", capsize=5, label="min-max over rounds")
    ax.scatter(x, [r["predicted_speedup"] for _, r in rows], color="tab:red", marker="D",
               zorder=3, label="predicted")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(x, [name for name, _ in rows], fontsize=8)
    ax.set_ylabel("speedup over the path's own target-only decoding")
    t = payload.get("training") or {}
    ax.set_title("A converged draft, greedy, per path" if t.get("outcome") == "plateau" else
                 f"A draft not yet at its plateau ({t.get('steps_done')} steps, "
                 f"{t.get('outcome')}), greedy, per path")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analysis(paths: dict) -> list[str]:
    """Sentences from the numbers: where a path loses or misses its prediction, by how much and
    what its own c, v and accepted length say would change it."""
    out = []
    for name in PATHS:
        r = paths.get(name)
        if r is None or not r.get("measured", True):
            continue
        n = PATH_NAMES[name]
        be = r["break_even"]
        gap = r["predicted_minus_measured_rel"]
        if r["speedup"] < 1.0:
            out.append(
                f"{n} loses ({r['speedup']:.2f}x): a step of gamma {r['gamma']} costs "
                f"{r['gamma']} x c {r['c']:.3f} + v {r['v']:.2f} = {r['step_cost']:.2f} target "
                f"steps and brings {r['accepted_length']:.2f} tokens; 1.0x needs "
                f"{be['1x']['accepted_length_needed']:.2f} tokens per step at this cost, or c "
                f"<= {be['1x']['c_needed']:.3f} at this v, or v <= {be['1x']['v_needed']:.2f} "
                "at this c.")
        if abs(gap) > 0.15:
            implied = r["accepted_length"] / r["speedup"]
            out.append(
                f"{n}: predicted {r['predicted_speedup']:.2f}x against {r['speedup']:.2f}x "
                f"measured ({gap * 100:+.0f}%): the measured speed implies a step cost of "
                f"{implied:.2f} target steps against the {r['step_cost']:.2f} its forwards "
                "predict; the difference is per-step work outside the model forwards.")
    ours = paths.get("ours")
    head = ours is not None and ours.get("measured", True)
    for name in ("llamacpp", "vllm"):
        r = paths.get(name)
        if r is None or not r.get("measured", True):
            continue
        if head:
            out.append(f"{PATH_NAMES[name]} runs the exported draft with the full 49,152-row "
                       f"head (an engine has no token map for a plain draft): c = {r['c']:.3f} "
                       f"({'llama-bench' if name == 'llamacpp' else 'adaspec forwards'}) "
                       f"against {ours['c']:.3f} for the same draft with its reduced head in "
                       "adaspec's decoder.")
        if name == "vllm" and "vllm_mean_accepted_length" in r:
            check = r.get("check", {})
            batch = ", ".join(f"{v['speedup']:.2f}x ({v['speedup_min']:.2f}-"
                              f"{v['speedup_max']:.2f}) at batch {k}"
                              for k, v in r.get("batch_n", {}).items())
            out.append(
                f"vLLM CPU: {r['speedup']:.2f}x at batch 1" + (f", {batch} (all prompts in one "
                                                              "call)" if batch else "")
                + f"; vLLM's mean accepted length {r['vllm_mean_accepted_length']:.3f}; "
                "bench/vllm_check's own check (outputs identical, MAL within 0.05 of "
                f"adaspec-eval's on the export): {'passed' if check.get('passed') else 'failed'}"
                + ("" if check.get("passed") else " (" + ", ".join(
                    k for k, v in check.items() if v is False and k != "passed") + ")") + ".")
        if name == "llamacpp":
            perfect = r["perfect_draft"]
            out.append(
                f"llama.cpp: the draft's GGUF ({r['gguf_type']}) is "
                f"{r['draft_bytes'] / 1e6:.0f} MB against the target's "
                f"{r['target_bytes'] / 1e6:.0f} MB ({r.get('target_gguf_type', 'Q4_1')}); "
                "one-token decoding on a CPU reads "
                "every weight, so c follows the "
                f"bytes. The target drafting for itself (c = 1, every draft accepted) ran at "
                f"{perfect['speedup']:.2f}x ({perfect['speedup_min']:.2f}-"
                f"{perfect['speedup_max']:.2f}).")
    return out


def read_path(work: Path, name: str) -> dict | None:
    f = work / "paths" / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def write_path(work: Path, name: str, result: dict) -> None:
    (work / "paths").mkdir(parents=True, exist_ok=True)
    (work / "paths" / f"{name}.json").write_text(json.dumps(result, indent=1))


def report(args, payload: dict) -> None:
    payload["summary"] = targets(payload["paths"])
    payload["analysis"] = analysis(payload["paths"])
    doc = Path(args.doc)
    png = doc.with_suffix(".png")
    if payload.get("training"):
        plot(payload, png)
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(markdown(payload, png.name))
    harness.write_json(args.out, payload)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = harness.parser("served_speedup", __doc__, rounds=3, data=False, progress=True,
                       package="studies")
    p.add_argument("--task", default="arith")
    p.add_argument("--train-rows", type=int, default=320)
    p.add_argument("--response-tokens", type=int, default=48,
                   help="longest training response (the demo's gen_max_new_tokens)")
    p.add_argument("--val-rows", type=int, default=8)
    p.add_argument("--cont-tokens", type=int, default=40,
                   help="tokens of the validation/test continuations (the demo's)")
    p.add_argument("--prompts", type=int, default=8, help="timed test prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="timed decoding length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--chunk-epochs", type=float, default=2.0)
    p.add_argument("--max-epochs", type=float, default=12.0)
    p.add_argument("--draft-vocab", type=int, default=2048)
    p.add_argument("--max-gamma", type=int, default=6)
    p.add_argument("--raw-prompts", action="store_true", help="no chat template")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--sft-epochs", type=float, default=1.0,
                   help="the target fine-tuned on the training rows first (0: untuned)")
    p.add_argument("--sft-lr", type=float, default=1e-5)
    p.add_argument("--draft", default="smollm2-135m@layers=2")
    p.add_argument("--paths", default="ours,assisted",
                   help=f"comma list of {','.join(PATHS)} to time (finished ones are reused)")
    p.add_argument("--retime", action="store_true", help="time --paths again")
    p.add_argument("--train-only", action="store_true", help="caches and training, no timing")
    p.add_argument("--no-train", action="store_true",
                   help="time the draft as it stands (its best model so far): training stopped "
                        "by a time budget, recorded as 'stopped'")
    p.add_argument("--vllm-venv", default=os.environ.get("VLLM_VENV", "/work/served-study/"
                                                                      "vllm-venv"))
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--vllm-rounds", type=int, default=None,
                   help="vLLM's timed rounds (default --rounds; each also decodes at batch N)")
    p.add_argument("--gguf-type", default="q8_0",
                   help="the llama.cpp draft's weight type (adaspec-export --gguf-type)")
    p.add_argument("--work", default="/work/served-study")
    p.add_argument("--doc", default=str(harness.REPO / "docs" / "served_speedup.md"))
    p.add_argument("--report-only", action="store_true",
                   help="re-make the doc and chart from the results JSON")
    p.add_argument("--note", action="append", default=[],
                   help="a sentence for the doc's notes (how this run went; repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    if args.report_only:
        payload = json.loads(Path(args.out).read_text())
        payload["settings"]["note"] = payload["settings"].get("note", []) + args.note
        report(args, payload)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    machine = harness.start(args)
    args.tuned_target = ensure_tuned_target(  # the paper's first step, as the converged study
        base_config(args, work, args.chunk_epochs, args.target), work / "target", args.sft_lr,
        args.sft_epochs, args.progress)
    cfg = base_config(args, work, args.chunk_epochs)
    if not args.no_train:
        ensure_caches(args, cfg, work)
    payload = {"benchmark": "served_speedup", "machine": machine, "settings": vars(args),
               "training": {}, "paths": {}, "summary": {}, "analysis": []}

    def partial(training: dict) -> None:  # after every chunk: the curve so far, paths timed
        payload["training"] = training
        best = runs.read_best(work / "draft")
        payload["paths"] = {n: r for n in PATHS if (r := read_path(work, n)) is not None
                            and r.get("draft_best", best) == best}
        report(args, payload)

    payload["training"] = ensure_draft(args, work, partial)
    asked = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = sorted(set(asked) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {','.join(unknown)}; choose from {','.join(PATHS)}")
    best = runs.read_best(work / "draft")

    def timed(name: str) -> dict | None:  # a path's timing, if it timed this best model
        r = read_path(work, name)
        return r if r is not None and r.get("draft_best", best) == best else None

    todo = [] if args.train_only else [x for x in asked if args.retime or not timed(x)]
    time_paths(args, cfg, work, todo, best)
    for name in PATHS:
        result = timed(name)
        if result is not None:
            payload["paths"][name] = result
    report(args, payload)
    print_paths(payload["paths"])
    return 0


def time_paths(args, cfg: Config, work: Path, todo: list[str], best: dict | None) -> None:
    """Time each path of `todo` and store its result in the work folder (an engine that fails
    is stored as not measured, with its reason)."""
    local = [x for x in todo if x in ("ours", "assisted")]
    if local:
        with harness.measure() as span:
            results = time_local(args, cfg, runs.best_dir(work / "draft"), local)
        for name, result in results.items():
            write_path(work, name, {**result, "loadavg": span.loadavg_after,
                                    "span": span.as_dict(), "draft_best": best})
    gamma = (read_path(work, "ours") or {}).get("gamma", args.max_gamma)
    for name, timer in (("llamacpp", time_llamacpp), ("vllm", time_vllm)):
        if name not in todo:
            continue
        try:
            with harness.measure() as span:
                result = timer(args, cfg, work, gamma)
            write_path(work, name, {**result, "loadavg": span.loadavg_after,
                                    "span": span.as_dict(), "draft_best": best})
        except (RuntimeError, OSError, subprocess.CalledProcessError, KeyError) as e:
            write_path(work, name, {"measured": False, "reason": f"{type(e).__name__}: {e}"})


def print_paths(paths: dict) -> None:
    for name, r in paths.items():
        if r.get("measured", True):
            print(f"{name}: {r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
                  f", predicted {r['predicted_speedup']:.2f}x, gamma {r['gamma']}, c {r['c']:.3f}"
                  f", v {r['v']:.2f}, accepted length {r['accepted_length']:.2f}")
        else:
            print(f"{name}: not measured ({r['reason']})")


if __name__ == "__main__":
    raise SystemExit(main())
