"""What an export starts from: the draft, the target and the evaluation its card quotes.

The draft is a run's final model (or its best-epoch model) or any model spec; the target is read
without its weights (tokenizer, config, generation config: all the draft must agree with); the two
must share a tokenizer, since engines compare token ids. An `adaspec-eval --json` file, when given,
supplies the acceptance the model card quotes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adaspec import models, runs
from adaspec.errors import UserError

SPECIAL_TOKENS = ("eos", "bos", "pad", "unk")


@dataclass(frozen=True)
class DraftSource:
    """Where the exported draft comes from."""

    model_spec: str
    """The folder (or any model spec) that is loaded."""
    run_dir: Path | None
    """The training run folder, or None for a plain model spec."""
    best: dict | None = None
    """The best model's record (`runs.read_best`) when the best-epoch model is exported."""


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
                else f"its training has not finished; export it once adaspec-train saved "
                f"{runs.MODEL_DIR}/")
        raise UserError(f"run folder {path} has no {sub}/ (no {sub}/config.json); {hint}")
    return DraftSource(model_spec=str(folder), run_dir=path,
                       best=runs.read_best(path) if best else None)


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
    models.check_same_tokenizer(draft_tokenizer, models.tokenizer_fingerprint(target_tokenizer),
                                f"the draft {draft}", f"the target {target}")
    for name in SPECIAL_TOKENS:
        a = getattr(draft_tokenizer, f"{name}_token_id", None)
        b = getattr(target_tokenizer, f"{name}_token_id", None)
        if a != b:
            raise UserError(f"the draft {draft} has {name}_token_id {a} but the target {target} "
                            f"has {b}; a draft must share its target's special tokens")


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

