"""Fidelity study: how faithful is the sparse cache, and which cache settings should be default.

For each task (real rows from ../shared/data, a train split carved from the file and a disjoint
held-out test split from the same file; never ../shared/holdout) and each cache setting
(K x mode x value encoding; ids always delta-coded, which is lossless):

1. Cache: a real target stage built with `build_stage` (the target's forward runs once per task
   and is reused by every setting); bytes per label token of the stored target stage.
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
dense stays under --max-gap (0.5 pt) for both k on every task.

    .venv/bin/python bench/fidelity.py                       # the committed study
    .venv/bin/python bench/fidelity.py --tasks gsm8k --topks 8 --modes topk --values float16 \
        --train-rows 4 --eval-rows 2 --work /tmp/fid-smoke --out /tmp/fid-smoke/f.json  # smoke

Work goes to --work (default /tmp/adaspec-fidelity); a re-run reuses what is finished there
(complete caches, trained drafts with their evaluation), so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_build import RESULTS, format_table, machine_info, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs" / "fidelity"
TASK_FILES = {
    "gsm8k": "gsm8k/train.jsonl",
    "alpaca": "alpaca/alpaca_5000.json",
    "xsum": "xsum/xsum-1000.jsonl",
    "mbpp": "mbpp/mbpp.jsonl",
    "cnn_dailymail": "cnn_dailymail/cnn_dailymail_validation_subset.csv",
}


@dataclass(frozen=True)
class Setting:
    """One cache setting."""

    k_cache: int
    mode: str
    value_encoding: str

    @property
    def name(self) -> str:
        return f"{self.mode}-K{self.k_cache}-{self.value_encoding}"


class LabelForwardMemo:
    """`label_hidden_and_head` of one model, remembered per batch of sequences.

    The hidden states at label positions are small (rows x hidden); the vocabulary head still
    runs per call, so every cache setting gets the logits exactly as a build computes them.
    """

    def __init__(self, model):
        self.model = model
        self.memo: dict[str, tuple] = {}

    def __call__(self, seqs, masks, pad_id):
        from adaspec.build import label_hidden_and_head

        key = hashlib.sha1(b"".join(s.tobytes() for s in [*seqs, *masks])).hexdigest()
        if key not in self.memo:
            self.memo[key] = label_hidden_and_head(self.model, seqs, masks, pad_id)
        return self.memo[key]

    def logits(self, seqs, masks, pad_id) -> torch.Tensor:
        n, logits_fn = self(seqs, masks, pad_id)
        return logits_fn(0, n)


# ---------------------------------------------------------------------------------------------
# Pieces of the study


def prepare_models(work: Path, target_spec: str, draft_spec: str) -> tuple[Path, Path]:
    """Save the target and the draft initialisation as folders (they then load in ~1 s)."""
    from adaspec import models

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
    from adaspec.config import build_config

    return build_config({
        "models": {"target": str(target), "draft": str(draft)},
        "data": {"task": task, "split": "train", "data_files": str(DATA / TASK_FILES[task]),
                 "limit": args.train_rows, "max_length": args.max_length},
        "cache": {"cache": str(cache)},
        "train": {"batch_size": args.batch_size, "epochs": args.epochs, "lr": args.lr,
                  "seed": args.seed, "loss": "fkl"},
    })


def setting_config(cfg, setting: Setting, cache: Path):
    return dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, cache=str(cache), topk=setting.k_cache, sparse=setting.mode,
        value_encoding=setting.value_encoding))


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
    from adaspec import train

    run = Path(cfg.train.out)
    model = run / "model"
    if (model / "config.json").exists():
        return model
    if run.exists():  # an interrupted run: short runs restart rather than resume
        shutil.rmtree(run)
    train.train(cfg, progress=progress)
    return model


def stage_bytes_per_token(cache: Path, task: str) -> dict:
    from cache_tools.info import cache_summary

    (record,) = [r for r in cache_summary(str(cache)) if r["split"] == f"{task}/train"]
    (stage,) = [s for s in record["stages"] if s["stage"] == "target"]
    return {"bytes_per_token": stage["bytes_per_label_token"],
            "compression_ratio": stage["compression_ratio"],
            "label_tokens": int(record["counts"]["label_tokens"])}


def entries_per_token(cache: Path, task: str) -> float:
    """Mean non-empty entries per label token (K for topk; distinct sampled ids for sample)."""
    from cache_tools.store import CacheReader

    reader = CacheReader(str(cache), task, "train")
    rows = reader.target_rows(0, reader.n_label_rows)
    if "counts" not in rows:
        return float(rows["ids"].shape[1])
    return float((rows["counts"] > 0).sum(axis=1).mean())


class HeldOut:
    """The held-out split's label tokens with the target's log-probs, computed once."""

    def __init__(self, cfg, target, tokenizer, batch_tokens: int, progress: bool):
        from adaspec import build, models
        from adaspec.evaluate import label_logprobs
        from adaspec.stream import online_sequences

        seqs = online_sequences(cfg, tokenizer)
        pairs = sorted((seqs.sequence(i) for i in range(seqs.n_sequences)),
                       key=lambda p: -len(p[0]))
        self.ids = [p[0] for p in pairs]
        self.masks = [p[1] for p in pairs]
        for m in self.masks:
            m[:1] = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab_size = models.real_vocab_size(tokenizer)
        self.plan = build.plan_batches(np.array([len(x) for x in self.ids]), batch_tokens)
        self.target_lp = [
            label_logprobs(target, self.ids[a:b], self.masks[a:b], self.pad_id, self.vocab_size)
            for a, b in tqdm(self.plan, desc="held-out target", disable=not progress)
        ]
        self.n_sequences = len(self.ids)
        self.group_sizes = [int(m.sum()) for m in self.masks]  # label tokens per sequence
        self.n_tokens = sum(self.group_sizes)

    def acceptance(self, draft) -> dict[str, torch.Tensor]:
        """Per-token expected acceptance sum min(p, q), greedy agreement and forward KL."""
        from adaspec import acceptance, losses
        from adaspec.evaluate import label_logprobs

        alpha, greedy, kl = [], [], []
        for (a, b), target_lp in zip(self.plan, self.target_lp, strict=True):
            draft_lp = label_logprobs(draft, self.ids[a:b], self.masks[a:b], self.pad_id,
                                      self.vocab_size)
            alpha.append(acceptance.expected_acceptance(target_lp, draft_lp))
            greedy.append(acceptance.greedy_agreement(target_lp, draft_lp).float())
            kl.append(losses.dense_divergence(draft_lp, target_lp, "fkl"))
        return {"alpha": torch.cat(alpha), "greedy": torch.cat(greedy), "kl": torch.cat(kl)}


def evaluate_model(held: HeldOut, model_dir: Path, key: str, cache_file: Path) -> dict:
    """Per-token acceptance of a saved draft, kept in `cache_file` (a re-run reuses it)."""
    from adaspec import models

    if cache_file.exists():
        stored = torch.load(cache_file)
        if stored.get("key") == key:
            return stored["values"]
    draft, _ = models.load_model(str(model_dir))
    values = held.acceptance(draft.eval())
    torch.save({"key": key, "values": values}, cache_file)
    return values


# ---------------------------------------------------------------------------------------------
# One task


def run_task(args, task: str, settings: list[Setting], target_dir: Path, draft_dir: Path,
             bar) -> list[dict]:
    from adaspec import fidelity, models
    from adaspec.build import build_stage
    from cache_tools.store import CacheReader

    work = Path(args.work) / task
    progress = args.progress
    cfg = base_config(args, task, target_dir, draft_dir, work / "caches" / settings[0].name)
    target, tokenizer = models.load_model(str(target_dir))
    target.eval().requires_grad_(False)
    memo = LabelForwardMemo(target)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab_size = models.real_vocab_size(tokenizer)
    timings: dict[str, float] = {}

    def step(label: str):
        bar.set_postfix_str(f"{task}: {label}")

    # 1. caches
    sizes = {}
    for s in settings:
        step(f"cache {s.name}")
        scfg = setting_config(cfg, s, work / "caches" / s.name)
        started = time.perf_counter()
        build_stage(scfg, "target", str(target_dir), progress=progress,
                    loaded=(target, tokenizer), label_forward=memo)
        timings[f"cache {s.name}"] = time.perf_counter() - started
        sizes[s.name] = stage_bytes_per_token(work / "caches" / s.name, task)
        sizes[s.name]["entries_per_token"] = entries_per_token(work / "caches" / s.name, task)
        bar.update(1)

    # 2. dense drafts (online): the reference (k = 1) and AdaSPEC k = 0.4 with it
    seq_cache = work / "caches" / settings[0].name  # defines the sequences and their order
    online_cfg = setting_config(cfg, settings[0], seq_cache)
    runs = work / "runs"
    step("dense k=1 (online)")
    started = time.perf_counter()
    dense_ref = train_once(train_config(online_cfg, "ref", 1.0, runs / "dense" / "k1",
                                        online=True, ref_name="dense"), progress)
    timings["train dense k1"] = time.perf_counter() - started
    bar.update(1)
    step(f"dense k={args.k:g} (online)")
    started = time.perf_counter()
    dense_sel = train_once(train_config(online_cfg, "draft", args.k,
                                        runs / "dense" / f"k{args.k:g}", online=True,
                                        ref=str(dense_ref)), progress)
    timings[f"train dense k{args.k:g}"] = time.perf_counter() - started
    bar.update(1)

    # 3. per-token losses and selection agreement, every cache against dense
    step("losses cached vs dense")
    draft0, _ = models.load_model(str(draft_dir))
    ref_model, _ = models.load_model(str(dense_ref))
    readers = {s.name: CacheReader(str(work / "caches" / s.name), task, "train")
               for s in settings}
    started = time.perf_counter()
    per_token = fidelity.per_token_losses(
        {"draft": draft0.eval(), "ref": ref_model.eval()}, readers, memo.logits, pad_id,
        vocab_size, batch_tokens=cfg.cache.batch_tokens, progress=progress)
    timings["losses"] = time.perf_counter() - started
    del draft0, ref_model
    batch_rows = fidelity.micro_batch_rows(readers[settings[0].name].label_offsets,
                                           args.batch_size)
    dense = per_token["dense"]
    quality = {}
    for s in settings:
        sparse = per_token[s.name]
        quality[s.name] = {
            "kl_rel_err_median": fidelity.error_summary(sparse["draft"], dense["draft"])["median"],
            "kl_rel_err_p95": fidelity.error_summary(sparse["draft"], dense["draft"])["p95"],
            "kl_rel_err_median_ref": fidelity.error_summary(sparse["ref"], dense["ref"])["median"],
            "kl_rel_err_p95_ref": fidelity.error_summary(sparse["ref"], dense["ref"])["p95"],
            "selection_jaccard": fidelity.selection_jaccard(
                sparse["draft"], sparse["ref"], dense["draft"], dense["ref"], args.k, batch_rows),
        }
    bar.update(1)

    # 4. drafts from each cache: reference k = 1, its losses into the cache, AdaSPEC k
    drafts = {}
    for s in settings:
        scfg = setting_config(cfg, s, work / "caches" / s.name)
        step(f"train {s.name} k=1")
        started = time.perf_counter()
        ref_dir = train_once(train_config(scfg, "ref", 1.0, runs / s.name / "k1"), progress)
        timings[f"train {s.name} k1"] = time.perf_counter() - started
        bar.update(1)
        step(f"ref stage + train {s.name} k={args.k:g}")
        started = time.perf_counter()
        build_stage(scfg, "ref", str(ref_dir), progress=progress)
        sel_dir = train_once(train_config(scfg, "draft", args.k, runs / s.name / f"k{args.k:g}",
                                          ref=None), progress)
        timings[f"train {s.name} k{args.k:g}"] = time.perf_counter() - started
        drafts[s.name] = {1.0: ref_dir, args.k: sel_dir}
        bar.update(1)

    # 5. acceptance on the held-out split
    step("held-out acceptance")
    eval_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, split="test", limit=args.eval_rows))
    started = time.perf_counter()
    held = HeldOut(eval_cfg, target, tokenizer, cfg.cache.batch_tokens, progress)
    eval_key = f"{task}-test-{args.eval_rows}-{args.max_length}-alpha-greedy-kl"
    init_acc = evaluate_model(held, draft_dir, eval_key, work / "eval-init.pt")
    dense_acc = {1.0: evaluate_model(held, dense_ref, eval_key, runs / "dense" / "k1.eval.pt"),
                 args.k: evaluate_model(held, dense_sel, eval_key,
                                        runs / "dense" / f"k{args.k:g}.eval.pt")}
    records = []
    for s in settings:
        for k_train, model_dir in drafts[s.name].items():
            acc = evaluate_model(held, model_dir, eval_key,
                                 runs / s.name / f"k{k_train:g}.eval.pt")
            gap, gap_se = fidelity.paired_difference(dense_acc[k_train]["alpha"], acc["alpha"],
                                                     held.group_sizes)
            records.append({
                "task": task, "setting": s.name, "k_cache": s.k_cache, "mode": s.mode,
                "value_encoding": s.value_encoding, "id_encoding": "delta", "k_train": k_train,
                **sizes[s.name], **quality[s.name],
                "alpha": float(acc["alpha"].mean()),
                "alpha_dense": float(dense_acc[k_train]["alpha"].mean()),
                "alpha_gap_pt": 100 * gap, "alpha_gap_stderr_pt": 100 * gap_se,
                "greedy_agreement": float(acc["greedy"].mean()),
                "greedy_agreement_dense": float(dense_acc[k_train]["greedy"].mean()),
                "alpha_untrained": float(init_acc["alpha"].mean()),
                "heldout_kl": float(acc["kl"].mean()),
                "heldout_kl_dense": float(dense_acc[k_train]["kl"].mean()),
                "heldout_kl_untrained": float(init_acc["kl"].mean()),
                "heldout_kl_gap": float(acc["kl"].mean() - dense_acc[k_train]["kl"].mean()),
            })
    timings["held-out acceptance"] = time.perf_counter() - started
    bar.update(1)
    sizes_info = {
        "train_sequences": readers[settings[0].name].n_sequences,
        "train_label_tokens": readers[settings[0].name].n_label_rows,
        "eval_sequences": held.n_sequences, "eval_label_tokens": held.n_tokens,
    }
    for r in records:
        r.update(sizes_info)
    # seconds of this invocation's steps (a re-run that reuses work reports only what it ran)
    (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    for r in records:
        r["task_seconds"] = sum(timings.values())
    return records


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
    print(format_table(header, rows))
    print()
    header = ["setting", "mean B/tok", "worst gap pt", "+2se", "min jaccard", "passes"]
    print(format_table(header, [[c["setting"], c["bytes_per_token"], c["worst_gap_pt"],
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


def plot(records: list[dict], out_dir: Path, chosen: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = sorted({r["task"] for r in records})
    styles = {("topk", "float16"): ("o", "-"), ("topk", "uint8q"): ("s", "--"),
              ("sample", "float16"): ("^", "-"), ("sample", "uint8q"): ("v", "--")}
    colors = {"topk": "tab:blue", "sample": "tab:orange"}
    paths = []

    def series(rs, key):
        out = {}
        for r in rs:
            out.setdefault((r["mode"], r["value_encoding"]), []).append(r)
        return {k: sorted(v, key=lambda r: r[key]) for k, v in out.items()}

    # acceptance gap and held-out KL gap vs bytes per label token
    ks = sorted({r["k_train"] for r in records})
    panels = [
        ("alpha_gap_pt", "alpha_gap_stderr_pt", "alpha gap to dense (pt, + = worse)",
         "dense alpha", "alpha_dense", 0.5, "gap_vs_bytes.png",
         f"acceptance gap vs cache size (green: within 0.5 pt); chosen: {chosen}"),
        ("heldout_kl_gap", None, "held-out KL - dense draft's (nats, + = worse)",
         "dense KL", "heldout_kl_dense", None, "kl_gap_vs_bytes.png",
         "held-out forward KL of each draft minus the dense-loss draft's"),
    ]
    for key, err_key, ylabel, dense_label, dense_key, band, name, title in panels:
        if any(key not in r for r in records):
            continue
        fig, axes = plt.subplots(len(ks), len(tasks), figsize=(5 * len(tasks), 3.6 * len(ks)),
                                 squeeze=False)
        for i, k in enumerate(ks):
            for j, task in enumerate(tasks):
                ax = axes[i][j]
                rs = [r for r in records if r["task"] == task and r["k_train"] == k]
                for (mode, enc), pts in series(rs, "bytes_per_token").items():
                    marker, line = styles[(mode, enc)]
                    ax.errorbar([p["bytes_per_token"] for p in pts], [p[key] for p in pts],
                                yerr=[p[err_key] for p in pts] if err_key else None,
                                marker=marker, linestyle=line, color=colors[mode], capsize=2,
                                label=f"{mode} {enc}")
                    for p in pts:
                        ax.annotate(f"K{p['k_cache']}", (p["bytes_per_token"], p[key]),
                                    fontsize=6, xytext=(2, 2), textcoords="offset points")
                if band:
                    ax.axhspan(-band, band, color="green", alpha=0.08)
                ax.axhline(0.0, color="gray", lw=0.8)
                ax.set_xscale("log")
                ax.set_xticks([10, 20, 50, 100, 200, 400],
                              ["10", "20", "50", "100", "200", "400"])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_title(f"{task}, k = {k:g}: {dense_label} {rs[0][dense_key]:.4f}",
                             fontsize=9)
                ax.set_xlabel("bytes per label token (target stage)")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # loss error and selection agreement vs K
    base = [r for r in records if r["k_train"] == ks[-1]]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        rs = [r for r in base if r["task"] == task]
        for (mode, enc), pts in series(rs, "k_cache").items():
            marker, line = styles[(mode, enc)]
            kc = [p["k_cache"] for p in pts]
            axes[0][j].plot(kc, [p["kl_rel_err_median"] for p in pts], marker=marker,
                            linestyle=line, color=colors[mode], label=f"{mode} {enc} median")
            axes[0][j].plot(kc, [p["kl_rel_err_p95"] for p in pts], marker=marker,
                            linestyle=":", color=colors[mode], alpha=0.6,
                            label=f"{mode} {enc} p95")
            axes[1][j].plot(kc, [p["selection_jaccard"] for p in pts], marker=marker,
                            linestyle=line, color=colors[mode], label=f"{mode} {enc}")
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
    paths.append(out_dir / "error_and_selection_vs_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="gsm8k,alpaca")
    parser.add_argument("--topks", default="8,16,32,64,128")
    parser.add_argument("--modes", default="topk,sample")
    parser.add_argument("--values", default="float16,uint8q")
    parser.add_argument("--train-rows", type=int, default=40)
    parser.add_argument("--eval-rows", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--k", type=float, default=0.4, help="AdaSPEC k of the selective drafts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-gap", type=float, default=0.5, help="allowed alpha gap, points")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", default="smollm2-135m@layers=2")
    parser.add_argument("--work", default="/tmp/adaspec-fidelity")
    parser.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    parser.add_argument("--plots", default=str(DOCS), help="folder for the PNG plots")
    parser.add_argument("--progress", action="store_true", help="show every inner progress bar")
    parser.add_argument("--report-only", action="store_true",
                        help="re-make the tables and plots from --out (nothing is computed)")
    args = parser.parse_args(argv)

    if args.report_only:
        payload = json.loads(Path(args.out).read_text())
        for r in payload["records"]:  # older runs: count entries from the work folder's caches
            cache = Path(args.work) / r["task"] / "caches" / r["setting"]
            if "entries_per_token" not in r and cache.exists():
                r["entries_per_token"] = entries_per_token(cache, r["task"])
        payload["choice"] = choose_default(payload["records"], payload["settings"]["max_gap"])
        report(payload, Path(args.plots))
        write_json(Path(args.out), payload)
        return 0

    import transformers

    if not args.progress:
        transformers.utils.logging.disable_progress_bar()
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASK_FILES or not (DATA / TASK_FILES[t]).exists():
            raise SystemExit(f"no data for task {t!r} under {DATA}")
    settings = [Setting(int(k), m, v) for m in args.modes.split(",")
                for v in args.values.split(",") for k in args.topks.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    check_work_folder(work, args)
    started = time.perf_counter()
    target_dir, draft_dir = prepare_models(work, args.target, args.draft)
    jobs_per_task = len(settings) * 3 + 4
    records = []
    with tqdm(total=jobs_per_task * len(tasks), desc="fidelity", dynamic_ncols=True) as bar:
        for task in tasks:
            records += run_task(args, task, settings, target_dir, draft_dir, bar)
    choice = choose_default(records, args.max_gap)
    wall = time.perf_counter() - started
    payload = {
        "benchmark": "fidelity",
        "description": "sparse cache settings vs dense losses: bytes per label token, "
                       "per-token KL error, AdaSPEC selection agreement, and held-out "
                       "acceptance of drafts trained from each cache vs online dense",
        "settings": {k: v for k, v in vars(args).items() if k not in ("progress",)},
        "data": {t: str(Path("../shared/data") / TASK_FILES[t]) for t in tasks},
        "splits": "train: the file's carved train split (first --train-rows); held-out: its "
                  "carved test split (first --eval-rows); ../shared/holdout is never read",
        "machine": machine_info(),
        "wall_seconds": wall,
        "records": records,
        "choice": choice,
    }
    report(payload, Path(args.plots))
    write_json(Path(args.out), payload)
    print(f"wrote {args.out}, plots and table.md in {args.plots} ({wall / 60:.1f} min)")
    return 0


def report(payload: dict, out_dir: Path) -> None:
    """Print the tables; write the plots and table.md into `out_dir` (paths into the payload)."""
    records, choice = payload["records"], payload["choice"]
    print_tables(records, choice)
    paths = plot(records, out_dir, choice["chosen"]["setting"] if choice["chosen"] else None)
    paths.append(out_dir / "table.md")
    paths[-1].write_text(markdown_table(records, choice))
    payload["plots"] = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                        for p in paths]


if __name__ == "__main__":
    raise SystemExit(main())
