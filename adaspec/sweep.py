"""Sweeps: many draft variants trained from one cache, evaluated offline, tabled and plotted.

Every variant (k, epochs, divergence, seed) trains from the cached target rows and reference
losses, so the target and the reference are never loaded; each is then evaluated offline on a
cache of the evaluation split. A variant whose folder holds `result.json` is finished: a re-run
skips it, so an interrupted sweep continues where it stopped.

`single_pass=True` trains the variants that share a data order (same seed and divergence) in
one pass over the data: each micro-batch is read and decoded once and every draft takes its
step on it. A variant with fewer epochs simply stops earlier. The drafts end exactly as they
would when trained one by one, since each sees the same batches in the same order.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from adaspec import evaluate, models, selection, train
from adaspec.config import Config
from adaspec.errors import UserError
from adaspec.stream import BatchStream
from cache_tools.store import CacheReader

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Variant:
    """One point of the grid."""

    k: float
    epochs: float
    loss: str
    seed: int

    @property
    def name(self) -> str:
        return f"k{self.k:g}-e{self.epochs:g}-{self.loss}-s{self.seed}"


def grid(ks: Iterable[float], epochs: Iterable[float], divergences: Iterable[str],
         seeds: Iterable[int]) -> list[Variant]:
    return [Variant(k, e, d, s) for d in divergences for s in seeds for e in epochs for k in ks]


def variant_config(cfg: Config, variant: Variant, run_dir: Path) -> Config:
    """The draft-stage config of one variant, written into its own run folder."""
    train_cfg = dataclasses.replace(
        cfg.train, stage="draft", k=variant.k, epochs=variant.epochs, loss=variant.loss,
        seed=variant.seed, out=str(run_dir), online=False,
    )
    return train.resolve_config(dataclasses.replace(cfg, train=train_cfg))


# ---------------------------------------------------------------------------------------------
# Training several variants in one pass


@dataclass
class _Learner:
    """One variant's model, optimiser and bookkeeping during a shared pass."""

    variant: Variant
    cfg: Config
    run_dir: Path
    loss_model: train.LossModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_micro: int
    seconds: float = 0.0


def train_single_pass(cfg: Config, variants: list[Variant], out: Path,
                      progress: bool = True) -> dict[str, float]:
    """Train `variants` (same seed and divergence) over one shared stream of batches.

    Returns the seconds each variant's own compute took (reading is shared and not counted).
    """
    if len({(v.seed, v.loss) for v in variants}) != 1:
        raise ValueError("a single pass needs one seed and one divergence")
    if cfg.train.grad_accum != 1:
        raise UserError("--single-pass trains with --grad-accum 1; drop --grad-accum or the flag")
    if cfg.train.selection != "adaspec" or cfg.train.threshold != "batch":
        raise UserError(
            "--single-pass implements AdaSPEC selection with the micro-batch threshold only; "
            f"selection={cfg.train.selection}, threshold={cfg.train.threshold} need the "
            "one-by-one sweep (drop --single-pass)"
        )
    base = variant_config(cfg, variants[0], out / variants[0].name)
    need_ref = any(train._needs_ref(variant_config(cfg, v, out)) for v in variants)
    reader = CacheReader(cfg.cache.cache, cfg.data.task, cfg.data.split)
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    torch.manual_seed(variants[0].seed)
    # fp32 master weights, as in train.train (bf16 only through autocast).
    draft, tokenizer = models.load_model(cfg.models.draft, dtype=torch.float32)
    train._check_tokenizer(reader, tokenizer, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab_size = int(reader.manifest["vocab_size"])
    ref = (cfg.cache.ref_name, variants[0].loss) if need_ref else None
    stream = BatchStream(reader, cfg.train.batch_size, variants[0].seed, pad_id, with_target=True,
                         ref=ref)
    per_epoch = stream.batches_per_epoch
    t = base.train

    learners = []
    for v in variants:
        vcfg = variant_config(cfg, v, out / v.name)
        model = copy.deepcopy(draft).to(device).train()
        loss_model = train.LossModel(model, vocab_size, v.loss, t.beta, t.chunk_tokens)
        optimizer = torch.optim.AdamW(train._param_groups(model, t.weight_decay), lr=t.lr)
        total_micro = max(1, round(vcfg.train.epochs / (v.k if t.scale_epochs_by_k else 1.0)
                                   * per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s, n=total_micro: train.lr_factor(s, n, t.lr_schedule, t.warmup_steps),
        )
        run_dir = Path(vcfg.train.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(vcfg.to_dict(), sort_keys=False))
        (run_dir / "metrics.jsonl").write_text("")
        learners.append(_Learner(v, vcfg, run_dir, loss_model, optimizer, scheduler, total_micro))

    longest = max(learner.total_micro for learner in learners)
    bar = tqdm(total=longest, desc=f"single pass x{len(learners)}", unit="batch",
               disable=not progress, dynamic_ncols=True)
    batches = stream.batches(start_batch=0, stop_batch=longest)
    try:
        for position, batch in enumerate(batches):
            target = train._to(batch.target, device)
            ref_loss = batch.ref_loss.to(device) if batch.ref_loss is not None else None
            inputs = (batch.input_ids.to(device), batch.attention_mask.to(device),
                      batch.index_b.to(device), batch.index_t.to(device))
            for learner in learners:
                if position >= learner.total_micro:
                    continue
                started = time.perf_counter()
                lr = learner.scheduler.get_last_lr()[0]
                per_token, _ = learner.loss_model(*inputs, target=target)  # (N,) float32
                if learner.variant.k < 1.0:
                    keep = selection.adaspec_select(per_token.detach(), ref_loss,
                                                    learner.variant.k, "batch")
                else:
                    keep = torch.ones_like(per_token, dtype=torch.bool)
                if t.normalize == "all":
                    loss = selection.reduce_loss(per_token, keep, batch.n_labels, "all")
                else:
                    loss = selection.reduce_loss(per_token, keep, 1, "selected")
                loss.backward()
                if t.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(learner.loss_model.parameters(),
                                                   t.max_grad_norm)
                learner.optimizer.step()
                learner.scheduler.step()
                learner.optimizer.zero_grad(set_to_none=True)
                learner.seconds += time.perf_counter() - started
                record = {"step": position + 1, "epoch": (position + 1) / per_epoch,
                          "loss": float(loss.detach()),
                          "selected_fraction": float(keep.float().mean()) if len(keep) else 0.0,
                          "lr": lr, "elapsed": learner.seconds}
                with (learner.run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
    finally:
        batches.close()
        bar.close()
    for learner in learners:
        models.save_model(learner.loss_model.model, tokenizer, learner.run_dir / "model")
    return {learner.variant.name: learner.seconds for learner in learners}


# ---------------------------------------------------------------------------------------------
# The sweep


def _final_loss(run_dir: Path) -> float | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None


def _evaluate_variant(cfg: Config, variant: Variant, run_dir: Path, eval_reader: CacheReader,
                      train_seconds: float, progress: bool) -> dict:
    draft, tokenizer = models.load_model(str(run_dir / "model"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    offline = evaluate.offline_acceptance(
        draft.eval(), eval_reader, models.real_vocab_size(tokenizer), pad_id,
        cfg.cache.batch_tokens, progress,
    )
    lower, upper = offline["expected_acceptance_lower"], offline["expected_acceptance_upper"]
    result = {
        "name": variant.name, "k": variant.k, "epochs": variant.epochs, "loss": variant.loss,
        "seed": variant.seed, "alpha_lower": lower, "alpha_upper": upper,
        "alpha_mid": (lower + upper) / 2, "greedy_agreement": offline["greedy_agreement"],
        "eval_tokens": offline["label_tokens"], "final_train_loss": _final_loss(run_dir),
        "train_seconds": train_seconds,
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_sweep(cfg: Config, variants: list[Variant], out: Path, eval_split: str = "test",
              single_pass: bool = False, progress: bool = True) -> list[dict]:
    """Train and evaluate every unfinished variant; write the table and plots; return all rows."""
    out = Path(out)
    try:
        eval_reader = CacheReader(cfg.cache.cache, cfg.data.task, eval_split)
    except Exception as err:  # CacheError: say how to make the evaluation cache
        raise UserError(
            f"{err}; the sweep evaluates offline on a cache of --eval-split {eval_split}: "
            f"`adaspec-cache build --model target --task {cfg.data.task} --split {eval_split} "
            "--sparse topk --topk 64 --value-encoding float16` (tight, exact offline bounds)"
        ) from None
    todo = [v for v in variants if not (out / v.name / RESULT_FILE).exists()]
    seconds: dict[str, float] = {}
    if single_pass:
        groups: dict[tuple, list[Variant]] = {}
        for v in todo:
            groups.setdefault((v.seed, v.loss), []).append(v)
        for group in groups.values():
            seconds.update(train_single_pass(cfg, group, out, progress))
    else:
        for v in todo:
            started = time.perf_counter()
            train.train(variant_config(cfg, v, out / v.name), progress=progress)
            seconds[v.name] = time.perf_counter() - started
    for v in todo:
        _evaluate_variant(cfg, v, out / v.name, eval_reader, seconds[v.name], progress)
    rows = [json.loads((out / v.name / RESULT_FILE).read_text()) for v in variants]
    write_tables(rows, out)
    plot_results(rows, out)
    return rows


COLUMNS = ["name", "k", "epochs", "loss", "seed", "alpha_lower", "alpha_upper", "alpha_mid",
           "greedy_agreement", "final_train_loss", "train_seconds"]


def write_tables(rows: list[dict], out: Path) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| variant | k | epochs | loss | seed | expected acceptance (offline bounds) | "
        "greedy agreement | final train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        final = "" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
        lines.append(
            f"| {r['name']} | {r['k']:g} | {r['epochs']:g} | {r['loss']} | {r['seed']} | "
            f"{r['alpha_lower']:.4f} - {r['alpha_upper']:.4f} | {r['greedy_agreement']:.4f} | "
            f"{final} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot_results(rows: list[dict], out: Path) -> None:
    """alpha_vs_k.png (one line per epochs/loss, bounds shaded) and loss_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["epochs"], r["loss"]), []).append(r)
    for (epochs, loss), points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["k"])
        ks = [p["k"] for p in points]
        line = ax.plot(ks, [p["alpha_mid"] for p in points], marker="o",
                       label=f"{epochs:g} epoch(s), {loss}")[0]
        ax.fill_between(ks, [p["alpha_lower"] for p in points],
                        [p["alpha_upper"] for p in points], color=line.get_color(), alpha=0.2)
        ax.plot(ks, [p["greedy_agreement"] for p in points], linestyle="--",
                color=line.get_color(), alpha=0.7)
    ax.set_xlabel("k (fraction of tokens kept)")
    ax.set_ylabel("acceptance (offline)")
    ax.set_title("expected acceptance (solid, bounds shaded); greedy agreement (dashed)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "alpha_vs_k.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        metrics = out / r["name"] / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        if records:
            ax.plot([m["step"] for m in records], [m["loss"] for m in records], label=r["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
