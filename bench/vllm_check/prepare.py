"""Project side of bench/vllm_check.sh, before vLLM runs (see bench/README.md, `vllm_check`).

In the project's virtualenv: the target saved as a folder that vLLM loads (the embedded target
is a GGUF file that only adaspec's loader dequantizes), the prompt token ids exactly as
adaspec-eval makes them (first N prompts of the split, rendered with the task's template and,
by default, the chat template, tokenized, cut to the last `max_length` tokens), adaspec's
target-only greedy output of each, and adaspec-eval's speculative decoding of them
(`adaspec.evaluate.evaluate`, i.e. `adaspec-eval --modes speculative --no-speed`) with its
outputs and the prompts it decoded, recorded on the way. Its outputs in the work folder:
target/ (cached: reused while it was saved from the same spec and weights), prompts.json (read
by engine.py and merge.py) and adaspec.json (read by merge.py).

    PYTHONPATH=. .venv/bin/python bench/vllm_check/prepare.py --export DIR --work DIR \
        [--target SPEC] [--task NAME] [--prompts N] [--max-new-tokens M] [--gamma G] \
        [--raw-prompts] [--data-files FILE]    # from the repository root (bench.instruments)
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

import harness
from adaspec import models, speculative
from adaspec.config import Config, build_config
from adaspec.evaluate import evaluate, split_prompts

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
    return [p[0].tolist() for p in split_prompts(cfg, tokenizer, cfg.eval.prompts)]


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


def target_outputs(target, prompts: list[list[int]], cfg: Config, tokenizer) -> dict:
    """adaspec's target-only greedy output of each prompt (`speculative.target_generate`, the
    baseline adaspec-eval times speculative decoding against)."""
    vocab, eos = models.real_vocab_size(tokenizer), tokenizer.eos_token_id
    outputs = []
    started = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            prompt = torch.tensor([ids], dtype=torch.long)
            out = speculative.target_generate(target, prompt, cfg.eval.max_new_tokens, 0.0, eos,
                                              vocab)
            outputs.append(out.tolist())
    return {"outputs": outputs, "seconds": time.perf_counter() - started}


def evaluate_recorded(cfg: Config, export: str, target) -> tuple[dict, list[dict]]:
    """(adaspec-eval's speculative result, each decoding's prompt ids and output ids).

    `evaluate` builds its prompts itself and keeps no outputs, so `speculative_generate` is
    wrapped to record what it was given and what it returned: the recorded prompts must be
    prompts.json's. The already-loaded target is handed to `evaluate` (not loaded again)."""
    calls = []
    generate = speculative.speculative_generate

    def recorded(target_model, draft, input_ids, *args, **kwargs):
        out, stats = generate(target_model, draft, input_ids, *args, **kwargs)
        calls.append({"prompt": input_ids[0].tolist(), "output": out.tolist()})
        return out, stats

    serve = harness.serving_models(
        lambda spec: (target, models.load_tokenizer(spec)) if spec == cfg.models.target else None)
    with harness.patched((speculative, "speculative_generate", recorded), serve):
        result = evaluate(cfg, [export], progress=False)[0]
    return result["speculative"], calls


def prepare(export: str, work: Path, target: str, task: str, prompts: int, max_new_tokens: int,
            gamma: int, chat_template: bool = True, data_files: str | None = None) -> dict:
    """Write target/, prompts.json and adaspec.json into `work`; returns adaspec.json's data."""
    cfg = eval_config(target, task, prompts, max_new_tokens, gamma, chat_template, data_files)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    target_model, tokenizer = saved_target(target, work / TARGET_DIR)
    seconds = {"target_folder": time.perf_counter() - started}
    ids = write_prompts(cfg, tokenizer, work / PROMPTS_FILE)["prompt_token_ids"]
    own = target_outputs(target_model, ids, cfg, tokenizer)
    seconds["adaspec_target_only"] = own["seconds"]
    started = time.perf_counter()
    spec, calls = evaluate_recorded(cfg, export, target_model)
    seconds["adaspec_eval"] = time.perf_counter() - started
    same = [c["prompt"] for c in calls] == ids
    if not same:
        print("vllm_check: adaspec-eval decoded other prompts than prompts.json",
              file=sys.stderr)
    payload = {
        "export": export, "target": target, "command": eval_command(cfg, export),
        "eval": spec, "eval_prompts_match": same,
        "outputs": {"target_only": own["outputs"],
                    "speculative": [c["output"] for c in calls]},
        "seconds": seconds,
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
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = prepare(args.export, args.work, args.target, args.task, args.prompts,
                  args.max_new_tokens, args.gamma, not args.raw_prompts, args.data_files)
    spec = out["eval"]
    print(f"vllm_check: adaspec-eval mean accepted length {spec['mean_accepted_length']:.4f} "
          f"({spec['accepted']} accepted in {spec['steps']} steps) on "
          f"{out['settings']['prompts']} prompts; prompts and target folder in {args.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
