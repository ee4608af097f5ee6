"""The GGUF export in llama.cpp (bench/llamacpp_check.sh builds llama.cpp, then runs this; see
bench/README.md, `llamacpp_check`). Not run by CI.

1. Exports the run's draft with `adaspec-export --format gguf` at each --gguf-types (and at f32
   and as a Hugging Face folder, which llama.cpp's own convert_hf_to_gguf.py turns into a GGUF
   compared tensor by tensor and key by key with ours, when the converter's imports are at hand).
2. adaspec's side, on the prompt token ids adaspec-eval makes (the task's test split, chat
   template; bench/vllm_check/prepare.py): adaspec's target-only greedy output and adaspec-eval's
   real speculative decoding of the same prompts (`--modes speculative --temperature 0`), whose
   mean accepted length llama.cpp's is compared with.
3. llama-server, one per configuration, the same ids as prompts (no re-tokenization), greedy,
   `cache_prompt` off: the target alone, the target drafting for itself (a perfect draft, all
   proposals accepted: llama.cpp's own speculative output, against which a draft's output is
   judged, since batched verification and one-token decoding differ numerically), and the target
   with each exported draft (`-md draft.gguf --spec-type draft-simple --spec-draft-n-max G
   --spec-draft-p-min 0`). Outputs and acceptance counters (the server's per-request log:
   accepted, drafted, verification steps) from a first pass; then --rounds timed rounds, the
   target-only and draft servers alternating per prompt (order swapped every round), tokens/s
   as the server reports it (generated tokens over generation time, prompt excluded).
4. llama-bench: the draft's and the target's cost per generated token and the target's cost of
   verifying G + 1 tokens at once, and the speedup they predict at llama.cpp's acceptance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "vllm_check"))

import prepare  # noqa: E402  (bench/vllm_check/prepare.py: prompt ids and adaspec-eval's counts)

import harness  # noqa: E402

QUIET_FILE = Path("/tmp/adaspec-quiet-llamacpp")
ACCEPT_LINE = re.compile(r"draft acceptance = [\d.]+ \(\s*(\d+) accepted /\s*(\d+) generated\), "
                         r"mean len =\s*([\d.]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One llama-server process on a free port, its log in a file (read for acceptance lines)."""

    def __init__(self, binary: Path, args: list[str], log: Path, threads: int):
        self.port = _free_port()
        self.log_path = log
        self.argv = [str(binary), *args, "-t", str(threads), "-tb", str(threads), "-c", "1024",
                     "-np", "1", "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.read_upto = 0

    def wait_ready(self, timeout: float = 600) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see "
                                   f"{self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"llama-server not ready after {timeout} s; see {self.log_path}")

    def complete(self, ids: list[int], n_predict: int) -> dict:
        body = json.dumps({"prompt": ids, "n_predict": n_predict, "temperature": 0.0,
                           "cache_prompt": False, "return_tokens": True, "seed": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=900) as resp:
            out = json.loads(resp.read())
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        new, self.read_upto = text[self.read_upto:], len(text)
        found = ACCEPT_LINE.findall(new)
        if found:  # the server's own count of this request: accepted, drafted, mean length
            accepted, drafted, mean_len = found[-1]
            out["acceptance"] = {"accepted": int(accepted), "drafted": int(drafted),
                                 "mean_len": float(mean_len)}
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def export_all(run: str, best: bool, target: str, types: list[str], work: Path) -> dict:
    """The run's draft as GGUF at each type (and f32), and as a Hugging Face folder."""
    from adaspec.export import export_draft
    from adaspec.export_gguf import GGUF_FILE, export_gguf

    files = {}
    for kind in dict.fromkeys([*types, "f32"]):
        out = work / f"gguf-{kind}"
        export_gguf(run, out, target=target, best=best, overwrite=True, gguf_type=kind)
        files[kind] = out / GGUF_FILE
    export_draft(run, work / "hf", target=target, best=best, overwrite=True)
    return files


def _field(reader, key):
    from gguf import GGUFValueType as V

    f = reader.fields[key]
    if f.types[0] == V.ARRAY:
        return [bytes(f.parts[i]) if f.types[-1] == V.STRING else f.parts[i].tolist()
                for i in f.data]
    return bytes(f.parts[f.data[0]]) if f.types[0] == V.STRING else f.parts[f.data[0]].tolist()


def compare_with_converter(ours: Path, hf_folder: Path, src: Path, work: Path,
                           pydeps: Path | None) -> dict:
    """llama.cpp's convert_hf_to_gguf.py (f32) on the HF export, against our f32 file."""
    import numpy as np
    from gguf import GGUFReader

    theirs = work / "converter-f32.gguf"
    env = dict(os.environ)
    if pydeps:
        env["PYTHONPATH"] = f"{pydeps}:{env.get('PYTHONPATH', '')}"
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_folder),
                           "--outtype", "f32", "--outfile", str(theirs)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"ran": False, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differing = [n for n in sorted(set(ta) & set(tb))
                 if ta[n].tensor_type != tb[n].tensor_type
                 or list(ta[n].shape) != list(tb[n].shape)
                 or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    skip = {"GGUF.kv_count", "general.name"}
    keys_a, keys_b = set(a.fields) - skip, set(b.fields) - skip
    differing_keys = [k for k in sorted(keys_a & keys_b)
                      if a.fields[k].types != b.fields[k].types or _field(a, k) != _field(b, k)]
    tokenizer_keys = sorted(k for k in keys_b if k.startswith("tokenizer."))
    return {"ran": True, "tensors": len(ta), "same_tensor_names": set(ta) == set(tb),
            "tensors_differing": differing, "keys_only_ours": sorted(keys_a - keys_b),
            "keys_only_converter": sorted(keys_b - keys_a), "keys_differing": differing_keys,
            "tokenizer_keys_identical": all(k in keys_a and k not in differing_keys
                                            for k in tokenizer_keys)}


def llama_bench(binary: Path, model: Path, threads: int, n_gen: int, n_prompt: int,
                reps: int) -> dict:
    """llama-bench -o json: mean tokens/s of one test (tg n_gen or pp n_prompt)."""
    argv = [str(binary), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json",
            "-p", str(n_prompt), "-n", str(n_gen)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    row = rows[0]
    return {"avg_ts": row["avg_ts"], "stddev_ts": row["stddev_ts"],
            "n_prompt": row["n_prompt"], "n_gen": row["n_gen"], "build": row.get("build_commit")}


def strip_eos(tokens: list[int], eos: int) -> list[int]:
    """The generated ids without a final EOS (engines differ in returning it)."""
    return tokens[:-1] if tokens and tokens[-1] == eos else list(tokens)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@contextmanager
def quiet_window():
    """/tmp/adaspec-quiet-llamacpp exists while timing (other jobs may hold off)."""
    QUIET_FILE.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        QUIET_FILE.unlink(missing_ok=True)


@dataclass
class Exported:
    """The draft's GGUF files (per type, and f32) and the target's GGUF file."""

    draft_spec: str
    types: list[str]
    files: dict[str, Path]
    sizes: dict[str, int]
    target_gguf: Path
    converter: dict


@dataclass
class AdaspecSide:
    """adaspec's prompt ids, target-only outputs and adaspec-eval's speculative decoding."""

    cfg: object
    ids: list[list[int]]
    eos: int
    spec: dict
    calls: list[dict]
    outputs: dict[str, list[list[int]]]


@dataclass
class Served:
    """llama-server's outputs, acceptance and timed rounds, per configuration."""

    configs: dict[str, list[str]]
    results: dict
    rounds: list[dict]
    load_before: tuple
    load_after: tuple


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llamacpp-bin", type=Path, required=True)
    p.add_argument("--llamacpp-src", type=Path, required=True)
    p.add_argument("--cmake-flags", default="")
    p.add_argument("--pydeps", type=Path, default=None,
                   help="extra import path for llama.cpp's converter (sentencepiece)")
    p.add_argument("--run", default="demo/runs/adaspec-k0.4",
                   help="run folder (best/ is exported when present) or model spec")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--task", default="arith")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--gguf-types", default="q8_0,q4_0")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/adaspec-llamacpp-check"))
    p.add_argument("--out", default="bench/results/llamacpp.json")
    return p.parse_args(argv)


def export_step(args: argparse.Namespace) -> Exported:
    """Step 1: the draft exported (best/ when the run has one), the target's GGUF located and
    llama.cpp's converter compared with our f32 file."""
    from adaspec import runs

    run_path = Path(args.run)
    best = (runs.best_dir(run_path) / "config.json").is_file()
    draft_spec = str(runs.best_dir(run_path)) if best else args.run
    types = [t for t in args.gguf_types.split(",") if t]

    print(f"llamacpp_check: exporting {draft_spec} as GGUF ({', '.join(types)}, f32)")
    files = export_all(args.run, best, args.target, types, args.work)
    sizes = {k: f.stat().st_size for k, f in files.items()}
    from adaspec.export_inputs import target_location

    location, gguf_file = target_location(args.target)
    if not gguf_file:
        raise SystemExit("llamacpp_check: the target must be a GGUF file (or the embedded alias)")
    target_gguf = Path(location) / gguf_file
    converter = compare_with_converter(files["f32"], args.work / "hf", args.llamacpp_src,
                                       args.work, args.pydeps)
    print(f"llamacpp_check: converter comparison: {json.dumps(converter)[:300]}")
    return Exported(draft_spec, types, files, sizes, target_gguf, converter)


def adaspec_side(args: argparse.Namespace, draft_spec: str) -> AdaspecSide:
    """Step 2: the prompt ids, adaspec's target-only outputs and adaspec-eval's speculative
    decoding of them (PyTorch), final EOS stripped."""
    from adaspec import models

    print("llamacpp_check: adaspec side (target-only and adaspec-eval speculative, PyTorch)")
    cfg = prepare.eval_config(args.target, args.task, args.prompts, args.max_new_tokens,
                              args.gamma)
    target_model, tokenizer = models.load_model(args.target)
    ids = prepare.prompt_token_ids(cfg, tokenizer)
    own = prepare.target_outputs(target_model, ids, cfg, tokenizer)
    spec, calls = prepare.evaluate_recorded(cfg, draft_spec, target_model)
    del target_model
    eos = tokenizer.eos_token_id
    outputs = {"target_only": [strip_eos(o, eos) for o in own["outputs"]],
               "speculative": [strip_eos(c["output"], eos) for c in calls]}
    return AdaspecSide(cfg, ids, eos, spec, calls, outputs)


def server_configs(exported: Exported, gamma: int, threads: int) -> dict[str, list[str]]:
    """llama-server's arguments per configuration: target only, the target as its own (perfect)
    draft, and the target with each exported draft."""
    target_gguf = exported.target_gguf
    spec_args = ["--spec-type", "draft-simple", "--spec-draft-n-max", str(gamma),
                 "--spec-draft-p-min", "0", "-td", str(threads), "-tbd", str(threads)]
    configs = {"target_only": ["-m", str(target_gguf)],
               "perfect_draft": ["-m", str(target_gguf), "-md", str(target_gguf), *spec_args]}
    for kind in exported.types:
        configs[f"draft_{kind}"] = ["-m", str(target_gguf), "-md", str(exported.files[kind]),
                                    *spec_args]
    return configs


def first_pass(servers: dict[str, Server], ids: list[list[int]], max_new_tokens: int, eos: int,
               results: dict) -> None:
    """Every server's outputs and acceptance on every prompt, into `results`."""
    print("llamacpp_check: outputs and acceptance (first pass)")
    for name, server in servers.items():
        for prompt in ids:
            out = server.complete(prompt, max_new_tokens)
            results[name]["outputs"].append(strip_eos(out["tokens"], eos))
            results[name]["acceptance"].append(out.get("acceptance"))


def timed_round(servers: dict[str, Server], timed: list[str], ids: list[list[int]],
                max_new_tokens: int, r: int) -> dict[str, float]:
    """Round `r`: every prompt through the `timed` servers, the order swapped per prompt and
    round; tokens/s per server as the server reports it."""
    per = {n: {"tokens": 0, "seconds": 0.0} for n in timed}
    for i, prompt in enumerate(ids):
        order = timed if (r + i) % 2 == 0 else timed[::-1]
        for name in order:
            out = servers[name].complete(prompt, max_new_tokens)
            t = out["timings"]
            per[name]["tokens"] += t["predicted_n"]
            per[name]["seconds"] += t["predicted_ms"] / 1000
    tps = {n: v["tokens"] / v["seconds"] for n, v in per.items()}
    print(f"llamacpp_check: round {r + 1}: "
          + ", ".join(f"{n} {v:.1f} tok/s" for n, v in tps.items()))
    return tps


def serve(args: argparse.Namespace, configs: dict[str, list[str]], ids: list[list[int]],
          eos: int) -> Served:
    """Step 3: one llama-server per configuration; a first pass (outputs, acceptance), then
    --rounds timed rounds of every configuration but the perfect draft."""
    servers = {}
    results: dict = {name: {"outputs": [], "acceptance": [], "speed": []} for name in configs}
    rounds = []
    try:
        for name, server_args in configs.items():
            servers[name] = Server(args.llamacpp_bin / "llama-server", server_args,
                                   args.work / f"server-{name}.log", args.threads)
        for server in servers.values():
            server.wait_ready()
        first_pass(servers, ids, args.max_new_tokens, eos, results)
        timed = [n for n in servers if n != "perfect_draft"]
        load_before = os.getloadavg()
        with quiet_window():
            for r in range(args.rounds):
                rounds.append(timed_round(servers, timed, ids, args.max_new_tokens, r))
        load_after = os.getloadavg()
    finally:
        for server in servers.values():
            server.stop()
    return Served(configs, results, rounds, load_before, load_after)


def llama_bench_costs(args: argparse.Namespace, exported: Exported) -> dict:
    """Step 4: llama-bench's tokens/s of the target's and each draft's generation and of the
    target verifying gamma + 1 tokens at once."""
    print("llamacpp_check: llama-bench costs")
    bench = args.llamacpp_bin / "llama-bench"
    target_gguf = exported.target_gguf
    with quiet_window():
        costs = {"target_tg": llama_bench(bench, target_gguf, args.threads, 32, 0, 3),
                 "target_pp_verify": llama_bench(bench, target_gguf, args.threads, 0,
                                                 args.gamma + 1, 5)}
        for kind in exported.types:
            costs[f"draft_{kind}_tg"] = llama_bench(bench, exported.files[kind], args.threads,
                                                    32, 0, 3)
    return costs


def step_ms(costs: dict, gamma: int) -> tuple[float, float]:
    """(the target's ms per generated token, its ms verifying gamma + 1 tokens)."""
    target_ms = 1000 / costs["target_tg"]["avg_ts"]
    verify_ms = 1000 * (gamma + 1) / costs["target_pp_verify"]["avg_ts"]
    return target_ms, verify_ms


def summarize_drafts(args: argparse.Namespace, exported: Exported, ours: AdaspecSide,
                     served: Served, costs: dict) -> dict:
    """Per exported type: outputs against the perfect draft and target-only, llama.cpp's mean
    accepted length against adaspec-eval's, the cost ratios, predicted and measured speedup."""
    results, rounds, spec = served.results, served.rounds, ours.spec
    target_only = results["target_only"]["outputs"]
    perfect = results["perfect_draft"]["outputs"]
    target_ms, verify_ms = step_ms(costs, args.gamma)
    summary = {}
    for kind in exported.types:
        name = f"draft_{kind}"
        outs = results[name]["outputs"]
        acc = [a for a in results[name]["acceptance"] if a]
        accepted = sum(a["accepted"] for a in acc)
        # the server's mean length is 1 + accepted / steps: recover each request's steps
        steps = sum(round(a["accepted"] / (a["mean_len"] - 1)) if a["mean_len"] > 1 else 0
                    for a in acc)
        steps = steps or 1
        mal = 1 + accepted / steps
        draft_ms = 1000 / costs[f"{name}_tg"]["avg_ts"]
        c, v = draft_ms / target_ms, verify_ms / target_ms
        speedups = [r[name] / r["target_only"] for r in rounds]
        summary[kind] = {
            "file_bytes": exported.sizes[kind],
            "identical_to_perfect_draft": [a == b for a, b in zip(outs, perfect, strict=True)],
            "identical_to_target_only": [a == b for a, b in zip(outs, target_only, strict=True)],
            "first_difference_from_target_only": [first_difference(a, b) for a, b in
                                                  zip(outs, target_only, strict=True)],
            "accepted": accepted, "drafted": sum(a["drafted"] for a in acc),
            "steps": steps, "mean_accepted_length": mal,
            "adaspec_eval_mean_accepted_length": spec["mean_accepted_length"],
            "mal_difference": mal - spec["mean_accepted_length"],
            "draft_ms_per_token": draft_ms, "c": c, "v": v,
            "predicted_speedup": mal / (args.gamma * c + v),
            "speedup_rounds": speedups, "speedup_median": statistics.median(speedups),
        }
    return summary


def build_payload(args: argparse.Namespace, exported: Exported, ours: AdaspecSide,
                  served: Served, costs: dict, summary: dict, started: float) -> dict:
    """The JSON written to --out."""
    results, ids, target_gguf = served.results, ours.ids, exported.target_gguf
    target_only = results["target_only"]["outputs"]
    perfect = results["perfect_draft"]["outputs"]
    perfect_acc = [a for a in results["perfect_draft"]["acceptance"] if a]
    target_ms, verify_ms = step_ms(costs, args.gamma)
    return {
        "benchmark": "llamacpp",
        "llama_cpp": {"source": f"llama-cpp-python sdist {os.environ.get('LLAMACPP_PY_VERSION')}"
                      " (vendor/llama.cpp)", "build": costs["target_tg"]["build"],
                      "cmake_flags": args.cmake_flags, "threads": args.threads,
                      "server_args": {n: a for n, a in served.configs.items()}},
        "settings": {"run": args.run, "draft": exported.draft_spec, "target": args.target,
                     "target_gguf": str(target_gguf), "target_bytes": target_gguf.stat().st_size,
                     "task": args.task, "split": "test", "chat_template": True,
                     "prompts": len(ids), "max_new_tokens": args.max_new_tokens,
                     "gamma": args.gamma, "rounds": args.rounds, "greedy": True,
                     "cache_prompt": False},
        "machine": harness.machine_info(),
        "load_average": {"before_timing": served.load_before, "after_timing": served.load_after},
        "converter_comparison": exported.converter,
        "gguf_bytes": exported.sizes,
        "adaspec": {"command": prepare.eval_command(ours.cfg, exported.draft_spec),
                    "eval": ours.spec,
                    "eval_prompts_match": [c["prompt"] for c in ours.calls] == ids,
                    "llamacpp_target_only_identical_to_adaspec_target_only": [
                        a == b for a, b in zip(target_only, ours.outputs["target_only"],
                                               strict=True)]},
        "perfect_draft": {
            "identical_to_target_only": [a == b for a, b in zip(perfect, target_only,
                                                                strict=True)],
            "first_difference_from_target_only": [first_difference(a, b) for a, b in
                                                  zip(perfect, target_only, strict=True)],
            "accepted": sum(a["accepted"] for a in perfect_acc),
            "drafted": sum(a["drafted"] for a in perfect_acc)},
        "costs": {"target_ms_per_token": target_ms, "verify_ms": verify_ms, "llama_bench": costs},
        "rounds_tokens_per_second": served.rounds,
        "drafts": summary,
        "outputs": {**{n: r["outputs"] for n, r in results.items()},
                    **{f"adaspec_{n}": o for n, o in ours.outputs.items()}},
        "seconds": time.monotonic() - started,
    }


def print_report(args: argparse.Namespace, summary: dict, n_prompts: int,
                 rounds: list[dict]) -> None:
    print(harness.format_table(
        ["draft", "MB", "= perfect", "= target-only", "MAL llama.cpp", "MAL adaspec-eval", "c",
         "v", "predicted", "speedup (median)"],
        [[k, f"{s['file_bytes'] / 1e6:.1f}",
          f"{sum(s['identical_to_perfect_draft'])}/{n_prompts}",
          f"{sum(s['identical_to_target_only'])}/{n_prompts}",
          f"{s['mean_accepted_length']:.3f}", f"{s['adaspec_eval_mean_accepted_length']:.3f}",
          f"{s['c']:.3f}", f"{s['v']:.2f}", f"{s['predicted_speedup']:.2f}x",
          f"{s['speedup_median']:.2f}x"] for k, s in summary.items()]))
    print(f"llamacpp_check: target alone {statistics.median(r['target_only'] for r in rounds):.1f}"
          f" tok/s (median of {args.rounds} rounds); results in {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    args.work.mkdir(parents=True, exist_ok=True)
    exported = export_step(args)
    ours = adaspec_side(args, exported.draft_spec)
    served = serve(args, server_configs(exported, args.gamma, args.threads), ours.ids, ours.eos)
    costs = llama_bench_costs(args, exported)
    summary = summarize_drafts(args, exported, ours, served, costs)
    harness.write_json(args.out, build_payload(args, exported, ours, served, costs, summary,
                                               started))
    print_report(args, summary, len(ours.ids), served.rounds)
    shutil.rmtree(args.work / "hf", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
