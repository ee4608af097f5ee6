"""Project side of bench/vllm_check.sh, before vLLM runs (see bench/README.md, `vllm_check`).

In the project's virtualenv: the target saved as a folder that vLLM loads (the embedded target
is a GGUF file that only adaspec's loader dequantizes), the prompt token ids exactly as
adaspec-eval makes them (first N prompts of the split, rendered with the task's template and,
by default, the chat template, tokenized, cut to the last `max_length` tokens), adaspec's own
greedy outputs on them (target only and speculative), and adaspec-eval's speculative counts
(`adaspec.evaluate.evaluate`, i.e. `adaspec-eval --modes speculative --no-speed`). Its outputs
in the work folder: target/ (cached: reused while it was saved from the same spec),
prompts.json (read by engine.py and merge.py) and adaspec.json (read by merge.py).

    python bench/vllm_check/prepare.py --export DIR --work DIR [--target SPEC] [--task NAME]
        [--prompts N] [--max-new-tokens M] [--gamma G] [--raw-prompts] [--data-files FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from adaspec import models, speculative, tasks
from adaspec.config import Config, build_config
from adaspec.evaluate import evaluate

TARGET_DIR, STAMP = "target", "adaspec-target.json"
PROMPTS_FILE, ADASPEC_FILE = "prompts.json", "adaspec.json"


def eval_config(target: str, task: str, prompts: int, max_new_tokens: int, gamma: int,
                chat_template: bool = True, data_files: str | None = None) -> Config:
    """The settings of `adaspec-eval --split test --modes speculative --temperature 0 --no-speed`
    with these values: one config for the prompt ids, adaspec's decoding and its evaluation."""
    return build_config(overrides={
        "models.target": target, "data.task": task, "data.split": "test",
        "data.chat_template": chat_template, "data.data_files": data_files,
        "eval.modes": "speculative", "eval.gamma": gamma, "eval.temperature": 0.0,
        "eval.max_new_tokens": max_new_tokens, "eval.prompts": prompts, "eval.speed": False,
    })


def eval_command(cfg: Config, draft: str) -> str:
    """The adaspec-eval command line that measures what `evaluate(cfg, [draft])` does here."""
    d, e = cfg.data, cfg.eval
    words = ["adaspec-eval", "--task", d.task, "--split", d.split, "--target", cfg.models.target,
             "--draft", draft, "--modes", "speculative", "--gamma", str(e.gamma),
             "--temperature", "0", "--max-new-tokens", str(e.max_new_tokens),
             "--prompts", str(e.prompts), "--no-speed"]
    if d.chat_template:
        words.append("--chat-template")
    if d.data_files:
        words += ["--data-files", d.data_files]
    return shlex.join(words)


def prompt_token_ids(cfg: Config, tokenizer) -> list[list[int]]:
    """The first `cfg.eval.prompts` prompts of the split as token ids, as adaspec-eval's
    speculative mode builds them (same examples, rendering, tokenization and truncation)."""
    d = cfg.data
    examples = tasks.load_examples(d.task, d.split, d.data_files, d.limit, d.seed)
    ids = []
    for example in examples[:cfg.eval.prompts]:
        text, _ = tasks.render(example, tokenizer, d.chat_template)
        ids.append([int(i) for i in tokenizer(text).input_ids[-d.max_length:]])
    return ids


def write_prompts(cfg: Config, tokenizer, path: Path) -> dict:
    """prompts.json: the prompt ids and how they were made (what engine.py feeds vLLM)."""
    payload = {
        "task": cfg.data.task, "split": cfg.data.split, "chat_template": cfg.data.chat_template,
        "data_files": cfg.data.data_files, "max_length": cfg.data.max_length,
        "target": cfg.models.target, "eos_token_id": tokenizer.eos_token_id,
        "prompt_token_ids": prompt_token_ids(cfg, tokenizer),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def saved_target(spec: str, folder: Path):
    """(target model, tokenizer), with `folder` holding it as save_pretrained files.

    The folder is reused when its stamp names the same spec and weight hash; otherwise it is
    written again (a changed target must not be compared under an old folder)."""
    identity = models.model_identity(spec)
    stamp = folder / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return models.load_model(str(folder))
    model, tokenizer = models.load_model(spec)
    shutil.rmtree(folder, ignore_errors=True)
    models.save_model(model, tokenizer, folder)
    stamp.write_text(json.dumps(identity, indent=1) + "\n")
    return model, tokenizer


def own_decoding(target, draft, prompts: list[list[int]], cfg: Config, tokenizer) -> dict:
    """adaspec's greedy outputs of each prompt: target only, and speculative with the draft
    (the same `adaspec.speculative` functions adaspec-eval decodes with), with the counts."""
    vocab = models.real_vocab_size(tokenizer)
    eos, gamma, n_new = tokenizer.eos_token_id, int(cfg.eval.gamma), cfg.eval.max_new_tokens
    target_out, spec_out, per_prompt = [], [], []
    stats = speculative.SpecStats()
    seconds = {"target_only": 0.0, "speculative": 0.0}
    with torch.no_grad():
        for ids in prompts:
            prompt = torch.tensor([ids], dtype=torch.long)
            started = time.perf_counter()
            out = speculative.target_generate(target, prompt, n_new, 0.0, eos, vocab)
            seconds["target_only"] += time.perf_counter() - started
            target_out.append(out.tolist())
            started = time.perf_counter()
            out, one = speculative.speculative_generate(target, draft, prompt, n_new, gamma,
                                                        0.0, eos, vocab)
            seconds["speculative"] += time.perf_counter() - started
            spec_out.append(out.tolist())
            stats = stats.merge(one)
            per_prompt.append({"steps": one.steps, "accepted": one.accepted,
                               "rejected": one.rejected, "new_tokens": one.new_tokens})
    return {
        "target_only": target_out, "speculative": spec_out, "seconds": seconds,
        "mean_accepted_length": stats.mean_accepted_length(), "steps": stats.steps,
        "accepted": stats.accepted, "per_prompt": per_prompt,
    }


def prepare(export: str, work: Path, target: str, task: str, prompts: int, max_new_tokens: int,
            gamma: int, chat_template: bool = True, data_files: str | None = None) -> dict:
    """Write target/, prompts.json and adaspec.json into `work`; returns adaspec.json's data."""
    cfg = eval_config(target, task, prompts, max_new_tokens, gamma, chat_template, data_files)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    target_model, tokenizer = saved_target(target, work / TARGET_DIR)
    seconds = {"target_folder": time.perf_counter() - started}
    ids = write_prompts(cfg, tokenizer, work / PROMPTS_FILE)["prompt_token_ids"]
    draft_model, _ = models.load_model(export)
    started = time.perf_counter()
    own = own_decoding(target_model, draft_model, ids, cfg, tokenizer)
    seconds["own_decoding"] = time.perf_counter() - started
    del target_model, draft_model
    started = time.perf_counter()
    result = evaluate(cfg, [export], progress=False)[0]
    seconds["adaspec_eval"] = time.perf_counter() - started
    spec = result["speculative"]
    # evaluate builds its prompts itself: equal per-prompt counts say it decoded the same ones.
    same = spec["per_prompt"] == own["per_prompt"]
    if not same:
        print("vllm_check: adaspec-eval's per-prompt counts differ from adaspec's decoding of "
              "prompts.json (other prompts?)", file=sys.stderr)
    payload = {
        "export": export, "target": target, "command": eval_command(cfg, export),
        "eval": spec, "own": own, "eval_matches_own_decoding": same, "seconds": seconds,
        "settings": {"task": task, "split": cfg.data.split, "chat_template": chat_template,
                     "prompts": len(ids), "max_new_tokens": max_new_tokens, "gamma": gamma,
                     "temperature": 0.0, "dtype": "float32"},
    }
    (work / ADASPEC_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="the draft: a folder from adaspec-export")
    p.add_argument("--work", required=True, type=Path, help="work folder (outputs, cache)")
    p.add_argument("--target", default=models.DEFAULT_ALIAS)
    p.add_argument("--task", default="arith")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--raw-prompts", action="store_true", help="no chat template")
    p.add_argument("--data-files", default=None, help="task rows (tasks that read files)")
    args = p.parse_args(argv)
    out = prepare(args.export, args.work, args.target, args.task, args.prompts,
                  args.max_new_tokens, args.gamma, not args.raw_prompts, args.data_files)
    spec = out["eval"]
    print(f"vllm_check: adaspec-eval mean accepted length {spec['mean_accepted_length']:.4f} "
          f"({spec['accepted']} accepted in {spec['steps']} steps) on {len(out['own']['per_prompt'])}"
          f" prompts; prompts and target folder in {args.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
