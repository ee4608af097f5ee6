"""Export a trained draft as a folder that transformers, vLLM and SGLang take as is.

Engines pair a draft with its target through conventions that a run's `model/` does not promise:
transformers' assisted generation and vLLM (`"method": "draft_model"`) both refuse a draft whose
config.vocab_size differs from the target's (transformers then asks for two tokenizers, vLLM
raises), engines pick the model class from config.json's `architectures`, and stop on the ids of
generation_config.json. `export_draft` writes such a folder: safetensors weights (a tied
embedding saved once, as transformers does), the embedding and head resized to the target's row
count, the target's tokenizer (refused unless it is the draft's), the target's generation config,
and a model card with the training settings and the acceptance measured for the draft. It then
reloads the folder alone and checks that the draft still proposes the same tokens.

Padding rows. A head row past the tokenizer that wins an argmax makes the draft propose an id the
tokenizer never produces (the target rejects it: a wasted step). Zero rows give logit 0, which
wins whenever every real logit is negative, and nothing pins the level of a bias-free head's
logits. Every row past the tokenizer's ids is therefore set to the mean of the real rows: its
logit is the mean of the real logits, never above their maximum (equal only when all are equal,
and argmax then returns the first maximum, a real id). Greedy drafting (transformers' assistant
under do_sample=False, vLLM's default `draft_sample_method` "greedy") thus only proposes real ids;
sampled drafting gives a padded id an average token's probability, and the target's rejection
step keeps the output exact. A head bias gets the mean real bias minus `PAD_BIAS_OFFSET` on those
rows, so they are never sampled either. The draft's own padding rows, if it had any, get the same
treatment; real ids never look up any of these rows in the embedding.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from adaspec import draft_vocab, models, runs
from adaspec.errors import UserError

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_BIAS_OFFSET = 1e4  # far below real logits, and still finite in float16
SPECIAL_TOKENS = ("eos", "bos", "pad", "unk")
DEFAULT_GAMMA = 5  # draft tokens per step in the printed engine commands without --eval-json
EXAMPLE_PROMPT = "Write a python function to reverse a string."


@dataclass(frozen=True)
class DraftSource:
    """Where the exported draft comes from."""

    model_spec: str
    """The folder (or any model spec) that is loaded."""
    run_dir: Path | None
    """The training run folder, or None for a plain model spec."""
    best: dict | None = None
    """best/best.json when the best-epoch model is exported."""


@dataclass(frozen=True)
class TargetInfo:
    """The target as the export needs it: no weights, only what the draft must agree with."""

    spec: str
    location: str
    """What `from_pretrained` takes (folder or hub id)."""
    gguf_file: str | None
    config: object
    generation_config: object
    tokenizer: object


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


def find_draft(run: str, best: bool = False) -> DraftSource:
    """A run folder -> its model/ (best/ with `best`); any other spec is loaded as it is.

    A folder that holds a run's files but no model/ is refused: training has not finished (or the
    model was deleted), and loading the folder itself would fail with a less useful message.
    """
    path = Path(run).expanduser()
    if not runs.is_run_folder(path):
        parsed = models.parse_model_spec(run)
        if parsed.kind == "dir" and not Path(parsed.source).expanduser().exists():
            raise UserError(f"{run} does not exist; pass a run folder (adaspec-train --out) or "
                            "a model spec")
        if best:
            raise UserError(f"--best needs a run folder with {runs.BEST_DIR}/; {run} is not a run "
                            "folder")
        return DraftSource(model_spec=run, run_dir=None)
    folder = runs.best_dir(path) if best else runs.model_dir(path)
    sub = folder.name
    if not (folder / "config.json").is_file():
        hint = ("train with --eval-split and --keep-best to keep one, or drop --best" if best
                else "its training has not finished; export it once adaspec-train saved model/")
        raise UserError(f"run folder {path} has no {sub}/ (no {sub}/config.json); {hint}")
    return DraftSource(model_spec=str(folder), run_dir=path,
                       best=runs.read_best(path) if best else None)


EXPORT_MARKER = "adaspec-export.json"
"""Written into every export: what --overwrite may replace (nothing else is ever deleted)."""


def is_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


def check_out_dir(out: Path, overwrite: bool, source: DraftSource) -> None:
    """Refuse to write over a non-empty folder (unless `overwrite`), or over the draft itself."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and overwrite and not is_export(out):
        raise UserError(f"--out {out} is not an earlier export (no {EXPORT_MARKER}); --overwrite "
                        "replaces only exports: choose another folder or empty it yourself")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it "
                        "or choose another folder")
    inputs = [Path(source.model_spec).expanduser()] + ([source.run_dir] if source.run_dir else [])
    resolved = out.resolve()
    for path in inputs:
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise UserError(f"--out {out} holds the draft being exported ({path}); "
                            "choose another folder")


def target_location(spec: str) -> tuple[str, str | None]:
    """(what `from_pretrained` takes, the .gguf file name or None) for a target spec.

    The same resolution as `adaspec.models` (which keeps it private): the export writes commands
    that load this target with plain transformers, outside adaspec.
    """
    parsed = models.parse_model_spec(spec)
    if parsed.kind == "alias":
        path = models.smollm2_gguf_path()
        return str(path.parent), path.name
    if parsed.kind == "hub":
        return parsed.source, None
    path = Path(parsed.source).expanduser().resolve()
    if parsed.kind == "gguf":
        return str(path.parent), path.name
    return str(path), None


def load_target(spec: str) -> TargetInfo:
    """The target's tokenizer, config and generation config, without its weights."""
    from transformers import AutoConfig, GenerationConfig

    spec = runs.resolve_run_folder(spec)
    tokenizer = models.load_tokenizer(spec)  # also checks that the spec exists
    location, gguf_file = target_location(spec)
    try:
        config = AutoConfig.from_pretrained(location, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"the config of target {spec!r} could not be read ({reason}); "
                        "pass a save_pretrained folder, a .gguf file or a cached hub id") from error
    generation = None
    if gguf_file is None:
        try:
            generation = GenerationConfig.from_pretrained(location)
        except (OSError, ValueError):
            generation = None  # no generation_config.json: derived from the config below
    if generation is None:
        generation = GenerationConfig.from_model_config(config)
    return TargetInfo(spec=spec, location=location, gguf_file=gguf_file, config=config,
                      generation_config=generation, tokenizer=tokenizer)


def check_same_tokenizer(draft_tokenizer, target_tokenizer, draft: str, target: str) -> None:
    """Refuse a draft whose tokenizer is not the target's: engines compare token ids, so a draft
    with other ids (or other special-token ids) proposes tokens the target reads as others."""
    mine = models.tokenizer_fingerprint(draft_tokenizer)
    theirs = models.tokenizer_fingerprint(target_tokenizer)
    if mine != theirs:
        raise UserError(
            f"the draft {draft} has another tokenizer than the target {target} (fingerprint "
            f"{mine} vs {theirs}); a draft must share its target's tokenizer"
        )
    for name in SPECIAL_TOKENS:
        a = getattr(draft_tokenizer, f"{name}_token_id", None)
        b = getattr(target_tokenizer, f"{name}_token_id", None)
        if a != b:
            raise UserError(f"the draft {draft} has {name}_token_id {a} but the target {target} "
                            f"has {b}; a draft must share its target's special tokens")


def fill_padding_rows(weight: torch.Tensor, real: int) -> None:
    """Rows `real:` of an embedding or head matrix <- the mean of rows `:real`, in place.

    With a head, the padded logit is then the mean of the real logits, which never exceeds their
    maximum, for any hidden state: no padded id can win an argmax (module docstring).
    """
    if weight.shape[0] > real:
        with torch.no_grad():
            weight[real:] = weight[:real].float().mean(dim=0).to(weight.dtype)


def tied_embeddings(model) -> bool:
    """Whether the head and the input embedding share one tensor (what is saved, not what the
    config claims: the two can disagree, and save_pretrained follows the tensors)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def pad_vocab(model, rows: int, real: int) -> int:
    """Give the embedding and head `rows` rows, every row past the tokenizer's `real` ids set so
    that it never wins an argmax; returns the row count before. Real rows are left untouched."""
    before = model.get_input_embeddings().weight.shape[0]
    if rows < real:
        raise UserError(f"the target's config.vocab_size is {rows} but its tokenizer has {real} "
                        "ids; the target does not match its tokenizer")
    if rows != before:
        # mean_resizing samples new rows from a Gaussian fitted to the old ones: random rows can
        # win an argmax, so the rows are set below instead.
        model.resize_token_embeddings(rows, mean_resizing=False)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    fill_padding_rows(embed.weight, real)
    if head is not None and not tied_embeddings(model):
        fill_padding_rows(head.weight, real)
    bias = getattr(head, "bias", None)
    if bias is not None and bias.shape[0] > real:
        with torch.no_grad():
            bias[real:] = bias[:real].float().mean().to(bias.dtype) - PAD_BIAS_OFFSET
    return before


def cast_weights(model, dtype: torch.dtype) -> None:
    """Cast the parameters only, as `from_pretrained(dtype=...)` loads them: `model.to` would
    also cast buffers such as rotary frequencies, which transformers keeps in float32, and the
    model checked against the saved folder would not be the one an engine loads."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)


def served_architectures(model, target: TargetInfo) -> tuple[list[str], str | None]:
    """config.json's `architectures`: the target's when draft and target share a model type
    (engines look the class up by this string), else the draft's own, with a note why."""
    own = [type(model).__name__]
    draft_type, target_type = model.config.model_type, target.config.model_type
    if draft_type == target_type:
        return list(target.config.architectures or own), None
    return own, (f"the draft is a {draft_type} model and the target a {target_type} model, so "
                 f"config.json keeps the draft's own architectures {own}")


def align_config(model, target: TargetInfo) -> None:
    """Token ids of the target, and a tie flag that says what the saved tensors do."""
    text_config = model.config.get_text_config()
    text_config.tie_word_embeddings = tied_embeddings(model)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(target.generation_config, name, None)
        if value is None:
            value = getattr(target.config, name, None)
        setattr(model.config, name, value)


def write_folder(folder: Path, model, target: TargetInfo, architectures: list[str]) -> None:
    """save_pretrained (safetensors; a tied head is stored once as the embedding, and re-tied on
    load from `tie_word_embeddings`), the target's tokenizer and generation config, and
    `architectures` (save_pretrained writes the class name; it is replaced afterwards)."""
    from transformers import GenerationConfig

    models.check_finite(model, f"exporting to {folder}")
    model.save_pretrained(folder)
    target.tokenizer.save_pretrained(folder)
    try:
        target.generation_config.save_pretrained(folder)
    except ValueError:  # a target's config that transformers now finds inconsistent: ids only
        ids = {name: getattr(target.generation_config, name, None)
               for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        GenerationConfig(**ids).save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = architectures
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def verify_export(folder: Path, model, real: int) -> None:
    """Reload the folder alone and compare with the model that was saved: a lost tie, a row
    saved wrong or a padded row that wins would otherwise show only as low acceptance."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = (torch.arange(48) * 7919 % real).unsqueeze(0)  # a fixed spread of real ids
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits.float()
        after = reloaded(input_ids=ids).logits.float()
    if after.shape[-1] != before.shape[-1]:
        raise RuntimeError(f"export check: the reloaded draft gives {after.shape[-1]} logits "
                           f"per token, the saved one {before.shape[-1]}")
    if not torch.equal(after[..., :real].argmax(-1), before[..., :real].argmax(-1)):
        raise RuntimeError("export check: the reloaded draft proposes other tokens than the "
                           "saved one on the real vocabulary")
    if int(after.argmax(-1).max()) >= real:
        raise RuntimeError("export check: a padded vocabulary row wins the argmax")


def transformers_command(out: Path, target: TargetInfo) -> str:
    """A shell line: transformers assisted generation of the target with the export as draft."""
    q = json.dumps  # a Python string literal (double quotes), so the shell quoting stays simple
    target_args = q(target.location) + (f", gguf_file={q(target.gguf_file)}"
                                        if target.gguf_file else "")
    code = (
        "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
        f"tok = T.from_pretrained({q(str(out))}); "
        f"target = M.from_pretrained({target_args}); "
        f"draft = M.from_pretrained({q(str(out))}); "
        f"x = tok({q(EXAMPLE_PROMPT)}, return_tensors={q('pt')}); "
        "y = target.generate(**x, assistant_model=draft, do_sample=False, max_new_tokens=64); "
        "print(tok.decode(y[0], skip_special_tokens=True))"
    )
    return f"python -c {shlex.quote(code)}"


def load_eval_result(path: str, model_spec: str) -> dict:
    """The entry of an `adaspec-eval --json` file for this draft (the only one, or the one whose
    draft resolves to the exported folder)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--eval-json {path} could not be read ({error})") from error
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(e, dict) and "draft" in e for e in entries):
        raise UserError(f"--eval-json {path} is not an adaspec-eval --json file "
                        "(no 'draft' entries)")
    if len(entries) == 1:
        return entries[0]
    want = Path(model_spec).expanduser().resolve()
    found = [e for e in entries
             if Path(runs.resolve_run_folder(e["draft"])).expanduser().resolve() == want]
    if len(found) != 1:
        drafts = ", ".join(str(e["draft"]) for e in entries)
        raise UserError(f"--eval-json {path} holds results for {drafts}; none of them is "
                        f"{model_spec}; pass a file with this draft's results")
    return found[0]


def export_draft(run: str, out: str | Path, target: str | None = None, best: bool = False,
                 overwrite: bool = False, eval_json: str | None = None,
                 dtype: str | None = None) -> ExportResult:
    """Write the serving folder of a run's draft (see the module docstring); returns what was
    done. The folder is written beside `out` and moved in place only once it checks out."""
    out = Path(out).expanduser()
    source = find_draft(run, best)
    check_out_dir(out, overwrite, source)
    run_config = runs.read_config(source.run_dir)
    target = target or run_config.get("models", {}).get("target")
    if not target:
        raise UserError(f"{run} has no config.yaml naming its target (not a run folder); "
                        "pass --target SPEC")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    evaluation = load_eval_result(eval_json, source.model_spec) if eval_json else None
    info = load_target(target)
    model, tokenizer = models.load_model(source.model_spec)
    check_same_tokenizer(tokenizer, info.tokenizer, source.model_spec, info.spec)
    reduced = draft_vocab.reduced_head_of(model)  # --draft-vocab: engines get the full head
    if reduced is not None:
        model.set_output_embeddings(draft_vocab.full_head(reduced))
    real = models.real_vocab_size(tokenizer)
    rows = info.config.get_text_config().vocab_size
    before = pad_vocab(model, rows, real)
    architectures, note = served_architectures(model, info)
    align_config(model, info)
    if dtype is not None:
        cast_weights(model, EXPORT_DTYPES[dtype])
    result = ExportResult(out=out.resolve(), draft=source.model_spec, target=info.spec,
                          real_vocab=real, rows_before=before, rows=rows,
                          architectures=architectures, command="", notes=[note] if note else [])
    result.command = transformers_command(result.out, info)
    if reduced is not None:
        result.notes.append(
            f"reduced-vocabulary draft: it predicts over {reduced.n_mapped} ids; the other "
            "rows of its head are the mean of those rows, so they never win an argmax. The map "
            f"is in {draft_vocab.SGLANG_MAP_FILE} (SGLang's --speculative-token-map), "
            f"{draft_vocab.D2T_FILE} (EAGLE-3 offsets) and {draft_vocab.MAP_FILE} (adaspec)")
    _write_checked(out, overwrite, model, info, architectures, real,
                   model_card(result, model, info, source, run_config, evaluation), reduced)
    return result


def _write_checked(out: Path, overwrite: bool, model, target: TargetInfo,
                   architectures: list[str], real: int, card: str, reduced=None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_folder(staging, model, target, architectures)
        if reduced is not None:
            draft_vocab.write_serving_maps(staging, reduced)
        (staging / "README.md").write_text(card)
        (staging / EXPORT_MARKER).write_text(json.dumps(
            {"made_by": "adaspec-export", "target": target.spec}, indent=2) + "\n")
        verify_export(staging, model, real)
        _readable(staging)
        if out.exists():
            if any(out.iterdir()) and not (overwrite and is_export(out)):  # changed meanwhile
                raise UserError(f"--out {out} is no longer empty (or no longer an export)")
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


CARD_TAGS = ("speculative-decoding", "draft-model", "adaspec")


def describe_method(train: dict) -> str:
    """One phrase for how the run trained the draft, from config.yaml's train section."""
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


def card_metadata(result: ExportResult, run_config: dict) -> dict:
    """The model card's YAML front matter: hub fields, then the method's settings."""
    train, data = run_config.get("train", {}), run_config.get("data", {})
    meta = {
        "base_model": run_config.get("models", {}).get("draft", result.draft),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(CARD_TAGS),
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
                "(config.yaml), so its training is not recorded here.", ""]
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
        lines += ["", f"This is the best-epoch model (`best/`): step {b.get('step')}, epoch "
                  f"{b.get('epoch')}, validation expected acceptance "
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
    target_args = q(target.location) + (f", gguf_file={q(target.gguf_file)}"
                                        if target.gguf_file else "")
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


def model_card(result: ExportResult, model, target: TargetInfo, source: DraftSource,
               run_config: dict, evaluation: dict | None) -> str:
    """README.md of the export: YAML front matter (hub metadata and the method's settings), then
    what the draft is, how it was trained, the acceptance measured for it and how to serve it."""
    text = model.config.get_text_config()
    params = sum(p.numel() for p in model.parameters())
    size = f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params:,}"
    what = [f"A {text.num_hidden_layers}-layer {text.model_type} draft ({size} "
            f"parameters) for speculative decoding with the target `{result.target}`, made by "
            "`adaspec-export`.", "",
            "- Tokenizer and `generation_config.json` are the target's (the draft's tokenizer "
            "was checked identical: fingerprint and special-token ids).",
            f"- `architectures`: {result.architectures}."]
    if result.rows > result.real_vocab:
        what.append(
            f"- Vocabulary: the tokenizer has {result.real_vocab} ids; `vocab_size` is "
            f"{result.rows}, the target's, because vLLM and transformers pair only drafts of "
            f"equal size. Rows {result.real_vocab}..{result.rows - 1} hold the mean of the real "
            "rows, so their logit is the mean of the real logits and never wins an argmax: "
            "greedy drafting proposes only real ids.")
    what += [f"- Note: {note}." for note in result.notes]
    gamma = int(evaluation.get("gamma", DEFAULT_GAMMA)) if evaluation else DEFAULT_GAMMA
    acceptance = _validation_lines(source) + _eval_lines(evaluation)
    if not acceptance:
        acceptance = ["No acceptance was measured for this draft (no validation lines in the "
                      "run's metrics.jsonl, no --eval-json).", ""]
    body = ([f"# Draft model for {result.target}", "", "## What it is", "", *what, "",
             *_training_lines(run_config, source), "## Acceptance", "", *acceptance,
             *_usage_lines(result, target, gamma)])
    front = yaml.safe_dump(card_metadata(result, run_config), sort_keys=False).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def _readable(folder: Path) -> None:
    """Modes as the umask allows: mkdtemp makes the folder 0700 and safetensors writes 0600,
    but a serving folder is read by other users (an engine's container, a hub upload job)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def format_summary(result: ExportResult) -> str:
    """What the CLI prints: the folder, its vocabulary, notes, and the transformers command."""
    rows = (f"{result.rows} vocabulary rows ({result.real_vocab} tokenizer ids"
            + (f"; the draft had {result.rows_before})" if result.rows != result.rows_before
               else ")"))
    lines = [f"exported {result.draft} to {result.out}",
             f"  for target {result.target}: {rows}, architectures {result.architectures}"]
    lines += [f"  note: {note}" for note in result.notes]
    lines += ["use it as transformers' assistant_model with the target:", result.command]
    return "\n".join(lines)
