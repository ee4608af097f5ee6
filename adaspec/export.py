"""Export a trained draft as a folder that transformers, vLLM and SGLang take as is.

Engines pair a draft with its target through conventions that a run's `model/` does not promise:
transformers' assisted generation and vLLM (`"method": "draft_model"`) both refuse a draft whose
config.vocab_size differs from the target's (transformers then asks for two tokenizers, vLLM
raises), engines pick the model class from config.json's `architectures`, and stop on the ids of
generation_config.json. `export_draft` writes such a folder: safetensors weights (a tied
embedding saved once, as transformers does), the embedding and head resized to the target's row
count, the target's tokenizer (refused unless it is the draft's), the target's generation config,
and a model card with the training settings and the acceptance measured for the draft
(`adaspec.model_card`). It then reloads the folder alone and checks that the draft still proposes
the same tokens. What it starts from (the draft, the target, the tokenizer check) is
`adaspec.export_inputs`.

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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adaspec import draft_vocab, models, runs
from adaspec.errors import UserError
from adaspec.export_inputs import (
    DraftSource,
    TargetInfo,
    check_same_tokenizer,
    find_draft,
    load_eval_result,
    load_target,
)
from adaspec.model_card import ExportResult, model_card, transformers_command

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_BIAS_OFFSET = 1e4  # far below real logits, and still finite in float16

EXPORT_MARKER = "adaspec-export.json"
"""Written into every export: what --overwrite may replace (nothing else is ever deleted)."""


def is_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


def check_out_dir(out: Path, overwrite: bool, source: DraftSource) -> None:
    """Refuse to write over a non-empty folder (unless `overwrite`), or over the draft itself."""
    if out.is_symlink():  # --overwrite deletes --out: never through a link
        raise UserError(f"--out {out} is a symlink; pass the folder itself (adaspec never "
                        "deletes or replaces through a link)")
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


@dataclass
class ServedDraft:
    """A draft made ready for engines, before it is written in any format."""

    source: DraftSource
    run_config: dict
    target: TargetInfo
    model: object
    """Full-vocabulary head (a reduced one replaced), rows padded to the target's, target ids."""
    reduced: object | None
    """The draft's `draft_vocab.ReducedHead`, or None for a full-vocabulary draft."""
    evaluation: dict | None
    result: ExportResult
    """What the export did so far; `command` is left to the format."""


def prepare_draft(run: str, out: str | Path, target: str | None = None, best: bool = False,
                  overwrite: bool = False, eval_json: str | None = None) -> ServedDraft:
    """Load a run's draft and its target and make the draft what engines pair with the target:
    the same tokenizer (refused otherwise), a full-vocabulary head padded to the target's rows
    (module docstring), the target's special-token ids. Shared by every export format."""
    out = Path(out).expanduser()
    source = find_draft(run, best)
    check_out_dir(out, overwrite, source)
    run_config = runs.read_config(source.run_dir)
    target = target or run_config.get("models", {}).get("target")
    if not target:
        raise UserError(f"{run} has no {runs.CONFIG_FILE} naming its target (not a run folder); "
                        "pass --target SPEC")
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
    result = ExportResult(out=out.resolve(), draft=source.model_spec, target=info.spec,
                          real_vocab=real, rows_before=before, rows=rows,
                          architectures=architectures, command="", notes=[note] if note else [])
    return ServedDraft(source=source, run_config=run_config, target=info, model=model,
                       reduced=reduced, evaluation=evaluation, result=result)


def export_draft(run: str, out: str | Path, target: str | None = None, best: bool = False,
                 overwrite: bool = False, eval_json: str | None = None,
                 dtype: str | None = None) -> ExportResult:
    """Write the serving folder of a run's draft (see the module docstring); returns what was
    done. The folder is written beside `out` and moved in place only once it checks out."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    draft = prepare_draft(run, out, target, best, overwrite, eval_json)
    model, info, reduced, result = draft.model, draft.target, draft.reduced, draft.result
    if dtype is not None:
        cast_weights(model, EXPORT_DTYPES[dtype])
    result.command = transformers_command(result.out, info)
    if reduced is not None:
        result.notes.append(
            f"reduced-vocabulary draft: it predicts over {reduced.n_mapped} ids; the other "
            "rows of its head are the mean of those rows, so they never win an argmax. The map "
            f"is in {draft_vocab.SGLANG_MAP_FILE} (SGLang's --speculative-token-map), "
            f"{draft_vocab.D2T_FILE} (EAGLE-3 offsets) and {draft_vocab.MAP_FILE} (adaspec)")
    card = model_card(result, model, info, draft.source, draft.run_config, draft.evaluation)
    _write_checked(Path(out).expanduser(), overwrite, model, info, result.architectures,
                   result.real_vocab, card, reduced)
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
        publish(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move a finished staging folder to --out (readable by all), replacing an earlier export
    only with --overwrite; a folder that changed meanwhile is refused."""
    make_readable(staging)
    if out.exists():
        if any(out.iterdir()) and not (overwrite and is_export(out)):  # changed meanwhile
            raise UserError(f"--out {out} is no longer empty (or no longer an export)")
        shutil.rmtree(out)
    staging.rename(out)


def make_readable(folder: Path) -> None:
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
