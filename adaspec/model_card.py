"""The model card (README.md) of an export, and the one-line command that tries the export.

The card opens with YAML front matter (hub metadata and the method's settings), then says what the
draft is, how it was trained (from the run's config), the acceptance measured for it (validation
lines of the run's metrics, an `adaspec-eval --json` result) and how to serve it with
transformers, vLLM and SGLang.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adaspec import runs
from adaspec.export_inputs import DraftSource, TargetInfo

CARD_TAGS = ("speculative-decoding", "draft-model", "adaspec")
DEFAULT_GAMMA = 5  # draft tokens per step in the printed engine commands without --eval-json
EXAMPLE_PROMPT = "Write a python function to reverse a string."


@dataclass
class ExportResult:
    """What an export did, for the CLI's summary and the model card."""

    out: Path
    draft: str
    target: str
    real_vocab: int
    rows_before: int
    rows: int
    architectures: list[str]
    command: str
    """The transformers one-liner using the export as `assistant_model`."""
    notes: list[str] = field(default_factory=list)


@dataclass
class GGUFExport:
    """What a GGUF export wrote (`adaspec.export_gguf`), for its card."""

    file: str
    type: str
    """--gguf-type of the 2-D weights."""
    tokenizer: str
    """Where its tokenizer metadata came from."""
    size_bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)


def _target_args(target: TargetInfo) -> str:
    """The arguments of `from_pretrained` that load the target, as Python source."""
    q = json.dumps  # a Python string literal (double quotes), so the shell quoting stays simple
    return q(target.location) + (f", gguf_file={q(target.gguf_file)}" if target.gguf_file else "")


def transformers_command(out: Path, target: TargetInfo, draft_gguf: str | None = None) -> str:
    """A shell line: transformers assisted generation of the target with the export as draft
    (a folder, or the GGUF file `draft_gguf` in it: the tokenizer is then the target's)."""
    q = json.dumps
    target_args = _target_args(target)
    draft_args = q(str(out)) + (f", gguf_file={q(draft_gguf)}" if draft_gguf else "")
    code = (
        "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
        f"tok = T.from_pretrained({target_args if draft_gguf else q(str(out))}); "
        f"target = M.from_pretrained({target_args}); "
        f"draft = M.from_pretrained({draft_args}); "
        f"x = tok({q(EXAMPLE_PROMPT)}, return_tensors={q('pt')}); "
        "y = target.generate(**x, assistant_model=draft, do_sample=False, max_new_tokens=64); "
        "print(tok.decode(y[0], skip_special_tokens=True))"
    )
    return f"python -c {shlex.quote(code)}"


def describe_method(train: dict) -> str:
    """One phrase for how the run trained the draft, from the run config's train section."""
    stage, k = train.get("stage"), train.get("k")
    if stage == "ref":
        return ("plain knowledge distillation from the target on every label token (k = 1): "
                "the AdaSPEC reference, also the DistillSpec baseline")
    if stage == "sft":
        return "fine-tuning on the task's labels (the target fine-tuning stage)"
    if train.get("selection") == "speckd":
        return ("selective distillation on the label tokens whose draft argmax is the target's "
                "top-1 (SpecKD rule)")
    if k == 1.0:
        return "plain knowledge distillation on every label token (k = 1, the DistillSpec baseline)"
    return (f"AdaSPEC selective knowledge distillation on the fraction k = {k} of label tokens "
            "with the largest gap between the draft's and the reference's loss")


def cache_settings(run_config: dict) -> dict | None:
    """The logit cache's settings the draft was trained from; None for an online run."""
    if run_config.get("train", {}).get("online"):
        return None
    cache = run_config.get("cache", {})
    sparse = cache.get("sparse")
    size_key = "draws" if sparse == "sample" else "topk"
    return {"sparse": sparse, size_key: cache.get(size_key),
            "value_encoding": cache.get("value_encoding")}


def card_metadata(result: ExportResult, run_config: dict, gguf: GGUFExport | None = None) -> dict:
    """The model card's YAML front matter: hub fields, then the method's settings."""
    train, data = run_config.get("train", {}), run_config.get("data", {})
    meta = {
        "base_model": run_config.get("models", {}).get("draft", result.draft),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(CARD_TAGS) + (["gguf", "llama.cpp"] if gguf else []),
        "target": result.target,
    }
    if train:
        meta.update(stage=train.get("stage"), k=train.get("k"), epochs=train.get("epochs"),
                    divergence=train.get("loss"), selection=train.get("selection"),
                    task=data.get("task"), cache=cache_settings(run_config))
    return meta


def _training_lines(run_config: dict, source: DraftSource) -> list[str]:
    if not run_config:
        return ["## How it was trained", "",
                f"Exported from `{source.model_spec}`, which has no adaspec run config "
                f"({runs.CONFIG_FILE}), so its training is not recorded here.", ""]
    m, d, t = (run_config.get(key, {}) for key in ("models", "data", "train"))
    cache = cache_settings(run_config)
    rows = [("method", describe_method(t)), ("target", m.get("target")),
            ("draft initialisation", m.get("draft")), ("task", d.get("task")),
            ("divergence", t.get("loss")), ("epochs", t.get("epochs")),
            ("learning rate", t.get("lr")),
            ("batch", f"{t.get('batch_size')} sequences x {t.get('grad_accum')} accumulation"),
            ("seed", t.get("seed")),
            ("teacher", "online (dense losses)" if cache is None else
             "logit cache: " + ", ".join(f"{k} {v}" for k, v in cache.items()))]
    lines = ["## How it was trained", "", "Trained with `adaspec-train` "
             "(https://arxiv.org/abs/2510.19779 for AdaSPEC).", "", "| setting | value |",
             "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if source.best:
        b = source.best
        lines += ["", f"This is the best-epoch model (`{runs.BEST_DIR}/`): step {b.get('step')}, "
                  f"epoch {b.get('epoch')}, validation expected acceptance "
                  f"{b.get('expected_acceptance', float('nan')):.4f}."]
    return lines + [""]


def _validation_lines(source: DraftSource, limit: int = 20) -> list[str]:
    records = ([r for r in runs.read_metrics(source.run_dir) if "validation" in r]
               if source.run_dir else [])
    if not records:
        return []
    best = max(records, key=lambda r: r["validation"]["expected_acceptance"])
    lines = ["### Validation during training (offline, from the cache)", "",
             "Expected acceptance is the mean over label tokens of sum_x min(p, q) (the "
             "probability that a sampled draft token is accepted), with the bounds the cached "
             "entries leave; greedy agreement is draft argmax == target argmax.", "",
             "| step | epoch | split | expected acceptance [bounds] | greedy agreement |",
             "| --- | --- | --- | --- | --- |"]
    for r in records[-limit:]:
        v = r["validation"]
        mark = " (best)" if r is best else ""
        lines.append(
            f"| {r['step']}{mark} | {r['epoch']:.2f} | {v.get('split')} | "
            f"{v['expected_acceptance']:.4f} [{v['expected_acceptance_lower']:.4f}, "
            f"{v['expected_acceptance_upper']:.4f}] | {v['greedy_agreement']:.4f} |")
    exported = "the best-epoch model" if source.best else "the final model (the last row)"
    return lines + ["", f"The exported weights are {exported}.", ""]


def _eval_lines(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return []
    e = evaluation
    lines = ["### Measured with `adaspec-eval`", "",
             f"On {e.get('task')}/{e.get('split')} (draft `{e.get('draft')}`, gamma "
             f"{e.get('gamma')}, temperature {e.get('temperature')}):", ""]
    if "offline" in e:
        o = e["offline"]
        lines.append(f"- offline (cache, {o['label_tokens']} label tokens): expected acceptance "
                     f"in [{o['expected_acceptance_lower']:.4f}, "
                     f"{o['expected_acceptance_upper']:.4f}], greedy agreement "
                     f"{o['greedy_agreement']:.4f}")
    if "exact" in e:
        x = e["exact"]
        lines.append(f"- exact (teacher-forced with the target, {x['label_tokens']} label tokens)"
                     f": expected acceptance {x['expected_acceptance']:.4f}, greedy agreement "
                     f"{x['greedy_agreement']:.4f}")
    if "speculative" in e:
        s = e["speculative"]
        line = (f"- speculative decoding ({e.get('n_prompts')} prompts): alpha "
                f"{s['alpha_paper']:.4f} (accepted / (accepted + rejected), the AdaSPEC paper's), "
                f"draft acceptance rate {s['draft_acceptance_rate_vllm']:.4f} (accepted / "
                f"drafted, vLLM's), mean accepted length {s['mean_accepted_length']:.3f}")
        if "speedup" in s:
            line += (f", speedup {s['speedup']:.2f} ± {s['speedup_spread']:.2f} over "
                     "target-only decoding (this machine, transformers)")
        lines.append(line)
    return lines + [""]


def _usage_lines(result: ExportResult, target: TargetInfo, gamma: int) -> list[str]:
    q = json.dumps
    out = str(result.out)
    served = str(Path(target.location) / target.gguf_file) if target.gguf_file else target.location
    spec_config = json.dumps({"method": "draft_model", "model": out,
                              "num_speculative_tokens": gamma})
    target_args = _target_args(target)
    lines = ["## How to use it", "", "### transformers (assisted generation)", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"tokenizer = AutoTokenizer.from_pretrained({q(out)})",
             f"target = AutoModelForCausalLM.from_pretrained({target_args})",
             f"draft = AutoModelForCausalLM.from_pretrained({q(out)})",
             f"inputs = tokenizer({q(EXAMPLE_PROMPT)}, return_tensors=\"pt\")",
             "out = target.generate(**inputs, assistant_model=draft, do_sample=False, "
             "max_new_tokens=64)",
             "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```", "",
             "### vLLM", "", "```bash",
             f"vllm serve {shlex.quote(served)} --speculative-config {shlex.quote(spec_config)}",
             "```", "", "### SGLang", "", "```bash",
             f"python -m sglang.launch_server --model-path {shlex.quote(served)} \\",
             "    --speculative-algorithm STANDALONE \\",
             f"    --speculative-draft-model-path {shlex.quote(out)} \\",
             f"    --speculative-num-steps {gamma} --speculative-eagle-topk 1 "
             f"--speculative-num-draft-tokens {gamma + 1}", "```", ""]
    if target.gguf_file:
        lines += ["The target was given as a GGUF file; vLLM and SGLang are best served the "
                  "original (save_pretrained or hub) weights of that model: replace the path.", ""]
    return lines


def _gguf_usage_lines(result: ExportResult, target: TargetInfo, gamma: int,
                      gguf: GGUFExport) -> list[str]:
    draft = shlex.quote(str(result.out / gguf.file))
    served = (shlex.quote(str(Path(target.location) / target.gguf_file)) if target.gguf_file
              else "TARGET.gguf")
    spec = f"--spec-type draft-simple --spec-draft-n-max {gamma} --spec-draft-p-min 0"
    lines = ["## How to use it", "", "### llama.cpp", "",
             "llama-server (an OpenAI-compatible endpoint), and the speculative example:", "",
             "```bash", f"llama-server -m {served} -md {draft} {spec}",
             f"llama-speculative-simple -m {served} -md {draft} {spec} \\",
             f"    --temp 0 -n 64 -p {shlex.quote(EXAMPLE_PROMPT)}", "```", "",
             "Flags of current llama.cpp (the one vendored by llama-cpp-python 0.3.36); older "
             f"builds name them `--draft-max {gamma} --draft-min 0 --draft-p-min 0`. "
             "`--spec-draft-p-min 0` drafts all the tokens every step (the default in these "
             "builds; older ones stopped below 0.75)."]
    if not target.gguf_file:
        lines += ["", "TARGET.gguf: the target converted with llama.cpp's convert_hf_to_gguf.py "
                  "(the draft's tokenizer metadata was built to match what it writes)."]
    lines += ["", "### transformers (assisted generation)", "", "```bash",
              transformers_command(result.out, target, draft_gguf=gguf.file), "```", ""]
    return lines


def model_card(result: ExportResult, model, target: TargetInfo, source: DraftSource,
               run_config: dict, evaluation: dict | None, gguf: GGUFExport | None = None) -> str:
    """README.md of the export: YAML front matter (hub metadata and the method's settings), then
    what the draft is, how it was trained, the acceptance measured for it and how to serve it;
    with `gguf`, the export is one GGUF file for llama.cpp."""
    text = model.config.get_text_config()
    params = sum(p.numel() for p in model.parameters())
    size = f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params:,}"
    what = [f"A {text.num_hidden_layers}-layer {text.model_type} draft ({size} "
            f"parameters) for speculative decoding with the target `{result.target}`, made by "
            "`adaspec-export`.", ""]
    if gguf:
        what += [f"- One GGUF file, `{gguf.file}` ({gguf.type}, {gguf.size_bytes / 1e6:.1f} MB; "
                 "norms in f32), llama architecture, for llama.cpp's draft models (`-md`).",
                 f"- Tokenizer metadata {gguf.tokenizer}; the draft's tokenizer was checked "
                 "identical to the target's (fingerprint and special-token ids), so llama.cpp's "
                 "draft/target vocabulary check passes."]
    else:
        what += ["- Tokenizer and `generation_config.json` are the target's (the draft's "
                 "tokenizer was checked identical: fingerprint and special-token ids).",
                 f"- `architectures`: {result.architectures}."]
    if result.rows > result.real_vocab:
        what.append(
            f"- Vocabulary: the tokenizer has {result.real_vocab} ids; `vocab_size` is "
            f"{result.rows}, the target's, because "
            f"{'llama.cpp, vLLM' if gguf else 'vLLM'} and transformers pair only drafts of "
            f"equal size. Rows {result.real_vocab}..{result.rows - 1} hold the mean of the real "
            "rows, so their logit is the mean of the real logits and never wins an argmax: "
            "greedy drafting proposes only real ids.")
    what += [f"- Note: {note}." for note in result.notes]
    gamma = int(evaluation.get("gamma", DEFAULT_GAMMA)) if evaluation else DEFAULT_GAMMA
    acceptance = _validation_lines(source) + _eval_lines(evaluation)
    if not acceptance:
        acceptance = ["No acceptance was measured for this draft (no validation lines in the "
                      f"run's {runs.METRICS_FILE}, no --eval-json).", ""]
    body = ([f"# Draft model for {result.target}", "", "## What it is", "", *what, "",
             *_training_lines(run_config, source), "## Acceptance", "", *acceptance,
             *(_gguf_usage_lines(result, target, gamma, gguf) if gguf
               else _usage_lines(result, target, gamma))])
    front = yaml.safe_dump(card_metadata(result, run_config, gguf), sort_keys=False).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip() + "\n"
