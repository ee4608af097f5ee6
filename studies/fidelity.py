"""Fidelity study: how faithful is the sparse cache, and which cache settings should be default.

For each task (real rows from ../shared/data, a train split carved from the file and a disjoint
held-out test split from the same file; never ../shared/holdout) and each cache setting
(K x mode x value encoding; ids always delta-coded, which is lossless):

1. Cache: a real target stage built with `build_stage` (the target's trunk runs once per batch
   and task: `labels.LabelLogits` is patched with a memo (`TargetMemo`), the vocabulary head and
   everything after it run per setting); bytes per label token of the stored target stage.
2. Per-token losses on the training rows, cached vs dense (full vocabulary, float32): forward KL
   of the untrained draft and of the dense-trained reference; median / p95 relative error.
3. Selection: AdaSPEC's official micro-batch rule at k = 0.4 (micro-batches of --batch-size
   sequences in cache order) on cached vs dense losses of the same draft and reference; Jaccard.
4. Drafts trained from the cache exactly as the pipeline does (same seed, data order, epochs):
   reference = k 1.0 from the cache (DistillSpec), its losses stored back (`build_stage` ref),
   then AdaSPEC k 0.4. The dense baseline trains the same two with `--online` (target and
   reference live, full-vocabulary losses).
5. Acceptance on the held-out split, teacher-forced with the target: mean sum_x min(p, q) over
   label tokens (the exact expected acceptance), and its gap to the dense draft of the same k,
   with the paired standard error of that gap.

Then the default is the setting with the smallest bytes per label token whose acceptance gap to
dense stays under --max-gap (0.5 pt) for both k on every task. The measures themselves live in
`studies/fidelity_measures.py`.

Work goes to --work (default /tmp/adaspec-fidelity); a re-run reuses what is finished there
(complete caches, trained drafts with their evaluation), so an interrupted study continues.
Commands: studies/README.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import harness
from adaspec import acceptance, build, labels, losses, models, runs, tasks, teacher_forced, train
from adaspec.config import build_config
from cache_tools.info import cache_summary
from cache_tools.store import CacheReader
from studies import fidelity_measures as measures

DOCS = harness.REPO / "docs" / "fidelity"


@dataclass(frozen=True)
class Setting:
    """One cache setting."""

    k_cache: int
    mode: str
    value_encoding: str

    @property
    def name(self) -> str:
        return f"{self.mode}-K{self.k_cache}-{self.value_encoding}"


class TargetMemo:
    """The target's `labels.LabelLogits` of each batch, built once and reused.

    The trunk runs once per batch; what is kept is small (the hidden states at label rows,
    rows x hidden). The vocabulary head still runs per call, so every cache setting gets the
    logits exactly as a build computes them.
    """

    def __init__(self, model):
        self.model = model
        self.base = labels.LabelLogits
        self.memo: dict[str, labels.LabelLogits] = {}

    def get(self, batch: labels.LabelBatch) -> labels.LabelLogits:
        key = hashlib.sha1(b"".join(t.numpy().tobytes() for t in (
            batch.input_ids, batch.attention_mask, batch.index_b, batch.index_t))).hexdigest()
        if key not in self.memo:
            self.memo[key] = self.base(self.model, batch)
        return self.memo[key]

    def logits(self, seqs, masks, pad_id) -> torch.Tensor:
        """The target_logits callable of `measures.per_token_losses`."""
        return self.get(labels.pad_batch(seqs, masks, pad_id))()

    def label_logits(self) -> type:
        """A `labels.LabelLogits` to patch in: the target's come from the memo, any other
        model's are computed as usual."""
        memo = self

        class MemoLabelLogits(memo.base):
            def __init__(self, model, batch, vocab_size=None):
                self.inner = memo.get(batch) if model is memo.model else None
                if self.inner is None:
                    super().__init__(model, batch, vocab_size)
                else:
                    self.vocab_size, self.n_rows = vocab_size, self.inner.n_rows

            def __call__(self, start=0, stop=None):
                if self.inner is None:
                    return super().__call__(start, stop)
                logits = self.inner(start, stop)
                return (logits if self.vocab_size is None
                        else models.cut_logits(logits, self.vocab_size))

        return MemoLabelLogits


# ---------------------------------------------------------------------------------------------
# Pieces of the study


def prepare_models(work: Path, target_spec: str, draft_spec: str) -> tuple[Path, Path]:
    """Save the target and the draft initialisation as folders (they then load in ~1 s)."""
    out = []
    for spec, name in ((target_spec, "target"), (draft_spec, "draft-init")):
        folder = work / "models" / name
        if not (folder / "config.json").exists():
            model, tokenizer = models.load_model(spec)
            models.save_model(model, tokenizer, folder)
            del model
        out.append(folder)
    return out[0], out[1]


REUSED_ARGS = ("target", "draft", "train_rows", "eval_rows", "max_length", "batch_size",
               "epochs", "lr", "k", "seed")


def check_work_folder(work: Path, args) -> None:
    """A work folder is reused only with the settings that made it (else results would mix)."""
    asked = {name: getattr(args, name) for name in REUSED_ARGS}
    stamp = work / "settings.json"
    if stamp.exists():
        stored = json.loads(stamp.read_text())
        differ = [f"{k}={stored.get(k)!r} (now {v!r})" for k, v in asked.items()
                  if stored.get(k) != v]
        if differ:
            raise SystemExit(f"--work {work} was made with {', '.join(differ)}; use another "
                             "--work folder or the same settings")
    else:
        stamp.write_text(json.dumps(asked, indent=2) + "\n")


def base_config(args, task: str, target: Path, draft: Path, cache: Path):
    return build_config({
        "models": {"target": str(target), "draft": str(draft)},
        "data": {"task": task, "split": "train", "data_files": harness.task_data(task),
                 "limit": args.train_rows, "max_length": args.max_length},
        "cache": {"cache": str(cache)},
        "train": {"batch_size": args.batch_size, "epochs": args.epochs, "lr": args.lr,
                  "seed": args.seed, "loss": "fkl"},
    })


def setting_config(cfg, setting: Setting, cache: Path):
    """K is the top-K of a topk setting and the draw count of a sample one."""
    return dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, cache=str(cache), topk=setting.k_cache, draws=setting.k_cache,
        sparse=setting.mode, value_encoding=setting.value_encoding))


def train_config(cfg, stage: str, k: float, out: Path, online: bool = False,
                 ref: str | None = None, ref_name: str = "ref"):
    return dataclasses.replace(
        cfg,
        models=dataclasses.replace(cfg.models, ref=ref),
        cache=dataclasses.replace(cfg.cache, ref_name=ref_name),
        train=dataclasses.replace(cfg.train, stage=stage, k=k, out=str(out), online=online),
    )


def train_once(cfg, progress: bool) -> Path:
    """Train unless the run folder already holds a finished model; returns the model folder."""
    run = Path(cfg.train.out)
    model = runs.model_dir(run)
    if runs.is_finished(run):
        return model
    if run.exists():  # an interrupted run: short runs restart rather than resume
        shutil.rmtree(run)
    train.train(cfg, progress=progress)
    return model


def stage_bytes_per_token(cache: Path, task: str) -> dict:
    (record,) = [r for r in cache_summary(str(cache)) if r["split"] == f"{task}/train"]
    (stage,) = [s for s in record["stages"] if s["stage"] == "target"]
    return {"bytes_per_token": stage["bytes_per_label_token"],
            "compression_ratio": stage["compression_ratio"],
            "label_tokens": int(record["counts"]["label_tokens"])}


def entries_per_token(cache: Path, task: str) -> float:
    """Mean non-empty entries per label token (K for topk; distinct sampled ids for sample)."""
    reader = CacheReader(str(cache), task, "train")
    rows = reader.target_rows(0, reader.n_label_rows)
    if "counts" not in rows:
        return float(rows["ids"].shape[1])
    return float((rows["counts"] > 0).sum(axis=1).mean())


class HeldOut:
    """The held-out split's label tokens with the target's log-probs, computed once."""

    def __init__(self, cfg, target, tokenizer, batch_tokens: int, progress: bool):
        # The split's sequences as a cache would store them (longest first).
        self.ids, self.masks, _ = labels.order_sequences(tasks.tokenize_split(cfg.data, tokenizer))
        self.pad_id = models.pad_id(tokenizer)
        self.vocab_size = models.real_vocab_size(tokenizer)
        self.plan = labels.plan_batches(np.array([len(x) for x in self.ids]), batch_tokens)
        self.target_lp = [
            teacher_forced.label_logprobs(target, self.ids[a:b], self.masks[a:b], self.pad_id,
                                    self.vocab_size)
            for a, b in tqdm(self.plan, desc="held-out target", disable=not progress)
        ]
        self.n_sequences = len(self.ids)
        self.group_sizes = [int(m.sum()) for m in self.masks]  # label tokens per sequence
        self.n_tokens = sum(self.group_sizes)

    def acceptance(self, draft) -> dict[str, torch.Tensor]:
        """Per-token expected acceptance sum min(p, q), greedy agreement and forward KL."""
        alpha, greedy, kl = [], [], []
        for (a, b), target_lp in zip(self.plan, self.target_lp, strict=True):
            draft_lp = teacher_forced.label_logprobs(draft, self.ids[a:b], self.masks[a:b],
                                               self.pad_id, self.vocab_size)
            alpha.append(acceptance.expected_acceptance(target_lp, draft_lp))
            greedy.append(acceptance.greedy_agreement(target_lp, draft_lp).float())
            kl.append(losses.dense_divergence(draft_lp, target_lp, "fkl"))
        return {"alpha": torch.cat(alpha), "greedy": torch.cat(greedy), "kl": torch.cat(kl)}


def evaluate_model(held: HeldOut, model_dir: Path, key: str, cache_file: Path) -> dict:
    """Per-token acceptance of a saved draft, kept in `cache_file` (a re-run reuses it)."""
    if cache_file.exists():
        try:  # tensors only: a file that is not what this study wrote is recomputed, never run
            stored = torch.load(cache_file, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError):
            stored = {}
        if isinstance(stored, dict) and stored.get("key") == key:
            return stored["values"]
    draft, _ = models.load_model(str(model_dir))
    values = held.acceptance(draft.eval())
    torch.save({"key": key, "values": values}, cache_file)
    return values


# ---------------------------------------------------------------------------------------------
# One task


def record(task: str, s: Setting, k_train: float, acc: dict, dense: dict, init: dict,
           held: HeldOut, size: dict, quality: dict) -> dict:
    """One row of the study: a setting's draft of one k against the dense draft of that k."""
    gap, gap_se = measures.paired_difference(dense["alpha"], acc["alpha"], held.group_sizes)
    return {
        "task": task, "setting": s.name, "k_cache": s.k_cache, "mode": s.mode,
        "value_encoding": s.value_encoding, "id_encoding": "delta", "k_train": k_train,
        **size, **quality,
        "alpha": float(acc["alpha"].mean()),
        "alpha_dense": float(dense["alpha"].mean()),
        "alpha_gap_pt": 100 * gap, "alpha_gap_stderr_pt": 100 * gap_se,
        "greedy_agreement": float(acc["greedy"].mean()),
        "greedy_agreement_dense": float(dense["greedy"].mean()),
        "alpha_untrained": float(init["alpha"].mean()),
        "heldout_kl": float(acc["kl"].mean()),
        "heldout_kl_dense": float(dense["kl"].mean()),
        "heldout_kl_untrained": float(init["kl"].mean()),
        "heldout_kl_gap": float(acc["kl"].mean() - dense["kl"].mean()),
    }


@dataclass
class TaskRun:
    """One task of the study: its caches, the dense and cached drafts, the per-token losses and
    the held-out acceptance; `run()` gives its records."""

    args: object
    task: str
    settings: list[Setting]
    target_dir: Path
    draft_dir: Path
    bar: object
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of this invocation's steps (a re-run that reuses work reports only what it ran)."""

    def __post_init__(self):
        self.work = Path(self.args.work) / self.task
        self.runs = self.work / "runs"
        self.progress = self.args.progress
        self.cfg = base_config(self.args, self.task, self.target_dir, self.draft_dir,
                               self.cache(self.settings[0]))
        self.target, self.tokenizer = models.load_model(str(self.target_dir))
        self.target.eval().requires_grad_(False)
        self.memo = TargetMemo(self.target)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def cache(self, s: Setting) -> Path:
        return self.work / "caches" / s.name

    def config(self, s: Setting):
        return setting_config(self.cfg, s, self.cache(s))

    def step(self, label: str, timed: str | None = None):
        """Show the step on the bar; time it into `timings[timed]` when named."""
        self.bar.set_postfix_str(f"{self.task}: {label}")
        return Timed(self.timings, timed)

    def build_caches(self) -> dict[str, dict]:
        """1. Every setting's target stage (the target served loaded, its trunk memoised)."""
        sizes = {}
        loaded = (self.target, self.tokenizer)
        for s in self.settings:
            with self.step(f"cache {s.name}", f"cache {s.name}"), harness.patched(
                    harness.serving_models(
                        lambda spec: loaded if spec == str(self.target_dir) else None),
                    (labels, "LabelLogits", self.memo.label_logits())):
                build.build_stage(self.config(s), "target", str(self.target_dir),
                                  progress=self.progress)
            sizes[s.name] = stage_bytes_per_token(self.cache(s), self.task)
            sizes[s.name]["entries_per_token"] = entries_per_token(self.cache(s), self.task)
            self.bar.update(1)
        return sizes

    def dense_drafts(self) -> dict[float, Path]:
        """2. Dense drafts (online): the reference (k = 1) and AdaSPEC k with it."""
        online_cfg = self.config(self.settings[0])  # defines the sequences and their order
        with self.step("dense k=1 (online)", "train dense k1"):
            ref = train_once(train_config(online_cfg, "ref", 1.0, self.runs / "dense" / "k1",
                                          online=True, ref_name="dense"), self.progress)
        self.bar.update(1)
        k = self.args.k
        with self.step(f"dense k={k:g} (online)", f"train dense k{k:g}"):
            selective = train_once(train_config(online_cfg, "draft", k,
                                                self.runs / "dense" / f"k{k:g}", online=True,
                                                ref=str(ref)), self.progress)
        self.bar.update(1)
        return {1.0: ref, k: selective}

    def loss_quality(self, dense_ref: Path) -> tuple[dict, dict]:
        """3. Per-token losses and selection agreement, every cache against dense."""
        draft0, _ = models.load_model(str(self.draft_dir))
        ref_model, _ = models.load_model(str(dense_ref))
        readers = {s.name: CacheReader(str(self.cache(s)), self.task, "train")
                   for s in self.settings}
        with self.step("losses cached vs dense", "losses"):
            per_token = measures.per_token_losses(
                {"draft": draft0.eval(), "ref": ref_model.eval()}, readers, self.memo.logits,
                self.pad_id, models.real_vocab_size(self.tokenizer),
                batch_tokens=self.cfg.cache.batch_tokens, progress=self.progress)
        batch_rows = measures.micro_batch_rows(readers[self.settings[0].name].label_offsets,
                                               self.args.batch_size)
        dense = per_token["dense"]
        quality = {}
        for s in self.settings:
            cached = per_token[s.name]
            draft_err = measures.error_summary(cached["draft"], dense["draft"])
            ref_err = measures.error_summary(cached["ref"], dense["ref"])
            quality[s.name] = {
                "kl_rel_err_median": draft_err["median"], "kl_rel_err_p95": draft_err["p95"],
                "kl_rel_err_median_ref": ref_err["median"], "kl_rel_err_p95_ref": ref_err["p95"],
                "selection_jaccard": measures.selection_jaccard(
                    cached["draft"], cached["ref"], dense["draft"], dense["ref"], self.args.k,
                    batch_rows),
            }
        self.bar.update(1)
        return quality, readers

    def cached_drafts(self) -> dict[str, dict[float, Path]]:
        """4. Drafts from each cache: reference k = 1, its losses into the cache, AdaSPEC k."""
        drafts, k = {}, self.args.k
        for s in self.settings:
            scfg = self.config(s)
            with self.step(f"train {s.name} k=1", f"train {s.name} k1"):
                ref_dir = train_once(train_config(scfg, "ref", 1.0, self.runs / s.name / "k1"),
                                     self.progress)
            self.bar.update(1)
            with self.step(f"ref stage + train {s.name} k={k:g}", f"train {s.name} k{k:g}"):
                build.build_stage(scfg, "ref", str(ref_dir), progress=self.progress)
                sel_dir = train_once(train_config(scfg, "draft", k,
                                                  self.runs / s.name / f"k{k:g}", ref=None),
                                     self.progress)
            drafts[s.name] = {1.0: ref_dir, k: sel_dir}
            self.bar.update(1)
        return drafts

    def heldout_records(self, dense: dict, drafts: dict, sizes: dict, quality: dict
                        ) -> tuple[list[dict], HeldOut]:
        """5. Acceptance on the held-out split; one record per setting and trained k."""
        eval_cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(
            self.cfg.data, split="test", limit=self.args.eval_rows))
        with self.step("held-out acceptance", "held-out acceptance"):
            held = HeldOut(eval_cfg, self.target, self.tokenizer, self.cfg.cache.batch_tokens,
                           self.progress)
            key = f"{self.task}-test-{self.args.eval_rows}-{self.args.max_length}-alpha-greedy-kl"
            init = evaluate_model(held, self.draft_dir, key, self.work / "eval-init.pt")
            dense_acc = {k: evaluate_model(held, d, key, self.runs / "dense" / f"k{k:g}.eval.pt")
                         for k, d in dense.items()}
            records = [
                record(self.task, s, k_train, evaluate_model(
                    held, model_dir, key, self.runs / s.name / f"k{k_train:g}.eval.pt"),
                    dense_acc[k_train], init, held, sizes[s.name], quality[s.name])
                for s in self.settings for k_train, model_dir in drafts[s.name].items()]
        self.bar.update(1)
        return records, held

    def run(self) -> list[dict]:
        sizes = self.build_caches()
        dense = self.dense_drafts()
        quality, readers = self.loss_quality(dense[1.0])
        drafts = self.cached_drafts()
        records, held = self.heldout_records(dense, drafts, sizes, quality)
        first = readers[self.settings[0].name]
        info = {"train_sequences": first.n_sequences, "train_label_tokens": first.n_label_rows,
                "eval_sequences": held.n_sequences, "eval_label_tokens": held.n_tokens}
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")
        for r in records:
            r.update(info)
            r["task_seconds"] = sum(self.timings.values())
        return records


class Timed:
    """A block's seconds into `timings[name]` (nothing when name is None)."""

    def __init__(self, timings: dict, name: str | None):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.name is not None:
            self.timings[self.name] = time.perf_counter() - self.started
        return False


# ---------------------------------------------------------------------------------------------
# Choosing the defaults, tables and plots


def choose_default(records: list[dict], max_gap_pt: float) -> dict:
    """Smallest mean bytes per label token among settings whose gap < max_gap on every run.

    Fidelity is two-sided (a cache that trains a different draft, better or worse, is not
    faithful), and a gap counts with its uncertainty: |gap| + 2 standard errors (paired,
    clustered by sequence) must stay under max_gap.
    """
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], []).append(r)
    rows = []
    for name, rs in by_setting.items():
        worst = max(abs(r["alpha_gap_pt"]) + 2 * r["alpha_gap_stderr_pt"] for r in rs)
        rows.append({
            "setting": name, "k_cache": rs[0]["k_cache"], "mode": rs[0]["mode"],
            "value_encoding": rs[0]["value_encoding"],
            "bytes_per_token": float(np.mean([r["bytes_per_token"] for r in rs])),
            "worst_gap_pt": max((r["alpha_gap_pt"] for r in rs), key=abs),
            "worst_gap_upper_pt": worst, "passes": worst < max_gap_pt,
            "min_selection_jaccard": min(r["selection_jaccard"] for r in rs),
        })
    rows.sort(key=lambda r: r["bytes_per_token"])
    passing = [r for r in rows if r["passes"]]
    return {"max_gap_pt": max_gap_pt, "candidates": rows,
            "chosen": passing[0] if passing else None}


def print_tables(records: list[dict], choice: dict) -> None:
    header = ["task", "setting", "B/tok", "KL err med", "KL err p95", "jaccard", "k",
              "alpha", "alpha dense", "gap pt", "+-"]
    rows = [[r["task"], r["setting"], r["bytes_per_token"], r["kl_rel_err_median"],
             r["kl_rel_err_p95"], r["selection_jaccard"], f"{r['k_train']:g}", r["alpha"],
             r["alpha_dense"], r["alpha_gap_pt"], r["alpha_gap_stderr_pt"]] for r in records]
    print(harness.format_table(header, rows))
    print()
    header = ["setting", "mean B/tok", "worst gap pt", "+2se", "min jaccard", "passes"]
    print(harness.format_table(header, [[c["setting"], c["bytes_per_token"], c["worst_gap_pt"],
                                 c["worst_gap_upper_pt"],
                                 c["min_selection_jaccard"], "yes" if c["passes"] else "no"]
                                for c in choice["candidates"]]))
    chosen = choice["chosen"]
    print(f"\nchosen default: {chosen['setting'] if chosen else 'none passes'}")


def markdown_table(records: list[dict], choice: dict) -> str:
    """One row per setting; per task: size, loss error, selection agreement, acceptance gaps."""
    tasks = sorted({r["task"] for r in records}, key=lambda t: (t != "gsm8k", t))
    ks = sorted({r["k_train"] for r in records}, reverse=True)
    head = ["setting", "mean B/tok"]
    for t in tasks:
        head += [f"{t} B/tok", f"{t} entries", f"{t} KL err (med / p95)", f"{t} Jaccard"]
        head += [f"{t} gap k={k:g} (pt)" for k in ks]
        head += [f"{t} KL - dense KL, k={k:g}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["setting"], r["task"], r["k_train"]): r for r in records}
    chosen = choice["chosen"]["setting"] if choice["chosen"] else None
    for c in choice["candidates"]:
        name = c["setting"]
        cells = [f"**{name}** (chosen)" if name == chosen else name, f"{c['bytes_per_token']:.1f}"]
        for t in tasks:
            r = by[(name, t, ks[0])]
            entries = r.get("entries_per_token", float("nan"))
            cells += [f"{r['bytes_per_token']:.1f}", f"{entries:.1f}",
                      f"{r['kl_rel_err_median']:.3f} / {r['kl_rel_err_p95']:.2f}",
                      f"{r['selection_jaccard']:.3f}"]
            for k in ks:
                g = by[(name, t, k)]
                cells.append(f"{g['alpha_gap_pt']:+.2f} ± {g['alpha_gap_stderr_pt']:.2f}")
            for k in ks:
                cells.append(f"{by[(name, t, k)].get('heldout_kl_gap', float('nan')):+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = choice["candidates"][0]["setting"]
    dense = []
    for t in tasks:
        for k in ks:
            r = by[(choice["candidates"][0]["setting"], t, k)]
            dense.append(f"{t} k={k:g}: {r['alpha_dense']:.4f}")
    untrained = {t: by[(choice["candidates"][0]["setting"], t, ks[0])]["alpha_untrained"]
                 for t in tasks}
    lines.append("")
    nan = float("nan")
    kls = [f"{t} k={k:g}: {by[(first, t, k)].get('heldout_kl_dense', nan):.3f}" for t in tasks
           for k in ks]
    kl0 = ", ".join(f"{t} {by[(first, t, ks[0])].get('heldout_kl_untrained', nan):.3f}"
                    for t in tasks)
    lines.append("Dense-loss drafts' held-out acceptance: " + ", ".join(dense) + "; untrained "
                 "draft: " + ", ".join(f"{t} {a:.4f}" for t, a in untrained.items()) + ".")
    lines.append("")
    lines.append("Held-out forward KL (nats per token) of the dense-loss drafts: "
                 + ", ".join(kls) + f"; untrained draft: {kl0}.")
    return "\n".join(lines) + "\n"


STYLES = {("topk", "float16"): ("o", "-"), ("topk", "uint8q"): ("s", "--"),
          ("sample", "float16"): ("^", "-"), ("sample", "uint8q"): ("v", "--")}
COLORS = {"topk": "tab:blue", "sample": "tab:orange"}


def series(rs: list[dict], key: str) -> dict[tuple, list[dict]]:
    """Records by (mode, value encoding), each sorted by `key`."""
    out: dict[tuple, list[dict]] = {}
    for r in rs:
        out.setdefault((r["mode"], r["value_encoding"]), []).append(r)
    return {k: sorted(v, key=lambda r: r[key]) for k, v in out.items()}


def gap_axis(ax, rs: list[dict], key: str, err_key: str | None, band: float | None) -> None:
    """One panel: `key` (a gap to dense) against bytes per label token, one line per family."""
    import matplotlib.ticker

    for (mode, enc), pts in series(rs, "bytes_per_token").items():
        marker, line = STYLES[(mode, enc)]
        ax.errorbar([p["bytes_per_token"] for p in pts], [p[key] for p in pts],
                    yerr=[p[err_key] for p in pts] if err_key else None,
                    marker=marker, linestyle=line, color=COLORS[mode], capsize=2,
                    label=f"{mode} {enc}")
        for p in pts:
            ax.annotate(f"K{p['k_cache']}", (p["bytes_per_token"], p[key]),
                        fontsize=6, xytext=(2, 2), textcoords="offset points")
    if band:
        ax.axhspan(-band, band, color="green", alpha=0.08)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks([10, 20, 50, 100, 200, 400], ["10", "20", "50", "100", "200", "400"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bytes per label token (target stage)")
    ax.grid(alpha=0.3)


def plot_gaps(records: list[dict], out_dir: Path, chosen: str | None) -> list[Path]:
    """Acceptance gap and held-out KL gap vs bytes per label token (a task x k grid each)."""
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records})
    ks = sorted({r["k_train"] for r in records})
    panels = [
        ("alpha_gap_pt", "alpha_gap_stderr_pt", "alpha gap to dense (pt, + = worse)",
         "dense alpha", "alpha_dense", 0.5, "gap_vs_bytes.png",
         f"acceptance gap vs cache size (green: within 0.5 pt); chosen: {chosen}"),
        ("heldout_kl_gap", None, "held-out KL - dense draft's (nats, + = worse)",
         "dense KL", "heldout_kl_dense", None, "kl_gap_vs_bytes.png",
         "held-out forward KL of each draft minus the dense-loss draft's"),
    ]
    paths = []
    for key, err_key, ylabel, dense_label, dense_key, band, name, title in panels:
        if any(key not in r for r in records):
            continue
        fig, axes = plt.subplots(len(ks), len(tasks), figsize=(5 * len(tasks), 3.6 * len(ks)),
                                 squeeze=False)
        for i, k in enumerate(ks):
            for j, task in enumerate(tasks):
                rs = [r for r in records if r["task"] == task and r["k_train"] == k]
                gap_axis(axes[i][j], rs, key, err_key, band)
                axes[i][j].set_title(f"{task}, k = {k:g}: {dense_label} {rs[0][dense_key]:.4f}",
                                     fontsize=9)
                axes[i][j].set_ylabel(ylabel)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_error_and_selection(records: list[dict], out_dir: Path) -> Path:
    """Loss error and selection agreement vs K (the records of the largest trained k)."""
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records})
    base = [r for r in records if r["k_train"] == max(r["k_train"] for r in records)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        rs = [r for r in base if r["task"] == task]
        for (mode, enc), pts in series(rs, "k_cache").items():
            marker, line = STYLES[(mode, enc)]
            kc = [p["k_cache"] for p in pts]
            axes[0][j].plot(kc, [p["kl_rel_err_median"] for p in pts], marker=marker,
                            linestyle=line, color=COLORS[mode], label=f"{mode} {enc} median")
            axes[0][j].plot(kc, [p["kl_rel_err_p95"] for p in pts], marker=marker,
                            linestyle=":", color=COLORS[mode], alpha=0.6,
                            label=f"{mode} {enc} p95")
            axes[1][j].plot(kc, [p["selection_jaccard"] for p in pts], marker=marker,
                            linestyle=line, color=COLORS[mode], label=f"{mode} {enc}")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("K (entries per label token)")
            ax.grid(alpha=0.3)
        axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("relative error of per-token KL")
        axes[0][j].set_title(f"{task}: untrained draft's KL, cached vs dense", fontsize=9)
        axes[1][j].set_ylabel("Jaccard of AdaSPEC k=0.4 sets")
        axes[1][j].set_title(f"{task}: selected tokens, cached vs dense losses", fontsize=9)
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "error_and_selection_vs_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(records: list[dict], out_dir: Path, chosen: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [*plot_gaps(records, out_dir, chosen), plot_error_and_selection(records, out_dir)]


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = harness.parser("fidelity", __doc__, data=False, progress=True,
                       package="studies")
    p.add_argument("--tasks", default="gsm8k,alpaca")
    p.add_argument("--topks", default="8,16,32,64,128",
                   help="K: top-K of topk settings, draws of sample settings")
    p.add_argument("--modes", default="topk,sample")
    p.add_argument("--values", default="float16,uint8q")
    p.add_argument("--train-rows", type=int, default=40)
    p.add_argument("--eval-rows", type=int, default=24)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--k", type=float, default=0.4, help="AdaSPEC k of the selective drafts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-gap", type=float, default=0.5, help="allowed alpha gap, points")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="smollm2-135m@layers=2")
    p.add_argument("--work", default="/tmp/adaspec-fidelity")
    p.add_argument("--plots", default=str(DOCS), help="folder for the PNG plots")
    p.add_argument("--report-only", action="store_true",
                   help="re-make the tables and plots from --out (nothing is computed)")
    return p.parse_args(argv)


def report_only(args) -> int:
    """Re-make the choice, tables and plots from the results file (nothing is computed)."""
    payload = json.loads(Path(args.out).read_text())
    for r in payload["records"]:  # older runs: count entries from the work folder's caches
        cache = Path(args.work) / r["task"] / "caches" / r["setting"]
        if "entries_per_token" not in r and cache.exists():
            r["entries_per_token"] = entries_per_token(cache, r["task"])
    payload["choice"] = choose_default(payload["records"], payload["settings"]["max_gap"])
    report(payload, Path(args.plots))
    harness.write_json(args.out, payload)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    info = harness.start(args)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if harness.task_data(t) is None:
            raise SystemExit(f"no data file for task {t!r} (generated); fidelity reads real rows")
    settings = [Setting(int(k), m, v) for m in args.modes.split(",")
                for v in args.values.split(",") for k in args.topks.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    check_work_folder(work, args)
    started = time.perf_counter()
    target_dir, draft_dir = prepare_models(work, args.target, args.draft)
    records = []
    with tqdm(total=(len(settings) * 3 + 4) * len(tasks), desc="fidelity",
              dynamic_ncols=True) as bar:
        for task in tasks:
            records += TaskRun(args, task, settings, target_dir, draft_dir, bar).run()
    choice = choose_default(records, args.max_gap)
    wall = time.perf_counter() - started
    payload = {
        "benchmark": "fidelity",
        "description": "sparse cache settings vs dense losses: bytes per label token, "
                       "per-token KL error, AdaSPEC selection agreement, and held-out "
                       "acceptance of drafts trained from each cache vs online dense",
        "settings": {k: v for k, v in vars(args).items() if k not in ("progress",)},
        "data": {t: str(Path("../shared/data") / harness.TASK_FILES[t]) for t in tasks},
        "splits": "train: the file's carved train split (first --train-rows); held-out: its "
                  "carved test split (first --eval-rows); ../shared/holdout is never read",
        "machine": info,
        "wall_seconds": wall,
        "records": records,
        "choice": choice,
    }
    report(payload, Path(args.plots))
    harness.write_json(args.out, payload)
    print(f"plots and table.md in {args.plots} ({wall / 60:.1f} min)")
    return 0


def report(payload: dict, out_dir: Path) -> None:
    """Print the tables; write the plots and table.md into `out_dir` (paths into the payload)."""
    records, choice = payload["records"], payload["choice"]
    print_tables(records, choice)
    paths = plot(records, out_dir, choice["chosen"]["setting"] if choice["chosen"] else None)
    paths.append(out_dir / "table.md")
    paths[-1].write_text(markdown_table(records, choice))
    payload["plots"] = [str(p.relative_to(harness.REPO)) if p.is_relative_to(harness.REPO)
                        else str(p) for p in paths]


if __name__ == "__main__":
    raise SystemExit(main())
