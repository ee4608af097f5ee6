"""What every CLI shares: config flags that override YAML, and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from adaspec.config import Config, load_config
from adaspec.errors import UserError
from cache_tools.errors import CacheError

# flag -> (config key, type, help); a flag given on the command line overrides the YAML value.
CONFIG_FLAGS: dict[str, tuple[str, type, str]] = {
    "--task": ("data.task", str, "task: gsm8k, alpaca, mbpp, cnn_dailymail, xsum, arith"),
    "--split": ("data.split", str, "split: train, validation, test, all"),
    "--data-files": ("data.data_files", str, "local data file (JSONL, JSON list, CSV)"),
    "--limit": ("data.limit", int, "use the first N examples of the split"),
    "--max-length": ("data.max_length", int, "tokens per sequence (default 512)"),
    "--chat-template": ("data.chat_template", bool, "format prompts with the chat template"),
    "--data-seed": ("data.seed", int, "seed of local-file splits and generated tasks"),
    "--cache": ("cache.cache", str, "cache root folder or URL (default ./cache)"),
    "--topk": ("cache.topk", int, "K per label token: draws (sample; default 8) or top-K"),
    "--sparse": ("cache.sparse", str, "sample (default) or topk (with tail bucket)"),
    "--value-encoding": ("cache.value_encoding", str, "uint8q (default) or float16"),
    "--id-encoding": ("cache.id_encoding", str, "plain or delta (sorted ids, differences)"),
    "--batch-tokens": ("cache.batch_tokens", int, "padded tokens per forward batch"),
    "--shard-rows": ("cache.shard_rows", int, "label rows per shard (write/resume unit)"),
    "--chunk-rows": ("cache.chunk_rows", int, "label rows per compressed chunk"),
    "--generate": ("cache.generate", bool, "cache the target on its own sampled responses"),
    "--gen-max-new-tokens": ("cache.gen_max_new_tokens", int, "longest sampled response"),
    "--gen-temperature": ("cache.gen_temperature", float, "sampling temperature (0 = greedy)"),
    "--ref-name": ("cache.ref_name", str, "name of the reference's stored losses"),
    "--target": ("models.target", str, "target model spec"),
    "--draft": ("models.draft", str, "draft model spec (SOURCE@layers=N derives one)"),
    "--dtype": ("models.dtype", str, "auto, float32, bfloat16, float16"),
    "--device-map": ("models.device_map", str, "device map for the target, e.g. auto"),
    "--ref": ("models.ref", str, "trained reference spec (default: the one recorded in the cache)"),
    "--stage": ("train.stage", str, "draft (AdaSPEC / k=1 KD), ref (plain-KD reference), sft"),
    "--k": ("train.k", float, "fraction of label tokens kept (1.0 = plain KD)"),
    "--loss": ("train.loss", str, "divergence: fkl, rkl, tvd, jsd"),
    "--beta": ("train.beta", float, "jsd mixture weight of the target"),
    "--selection": ("train.selection", str, "adaspec (delta top-k) or speckd (top-1 gate)"),
    "--threshold": ("train.threshold", str, "batch (per micro-batch) or global (running window)"),
    "--normalize": ("train.normalize", str, "all (label tokens, official) or selected (Eq. 10)"),
    "--epochs": ("train.epochs", float, "passes over the data (fractional allowed)"),
    "--batch-size": ("train.batch_size", int, "sequences per micro-batch per process"),
    "--grad-accum": ("train.grad_accum", int, "micro-batches per optimizer step"),
    "--lr": ("train.lr", float, "peak learning rate"),
    "--lr-schedule": ("train.lr_schedule", str, "constant or cosine"),
    "--warmup-steps": ("train.warmup_steps", int, "linear warmup steps"),
    "--weight-decay": ("train.weight_decay", float, "AdamW weight decay"),
    "--max-grad-norm": ("train.max_grad_norm", float, "gradient clipping (0 disables)"),
    "--mixed-precision": ("train.mixed_precision", str, "auto, no, bf16, fp16"),
    "--chunk-tokens": ("train.chunk_tokens", int, "label tokens per loss chunk"),
    "--checkpoint-every": ("train.checkpoint_every", int, "checkpoint every N steps (0: epochs)"),
    "--seed": ("train.seed", int, "seed of data order and initialisation"),
    "--out": ("train.out", str, "run folder (default runs/<stage>-<task>-k<k>-<loss>-s<seed>)"),
    "--online": ("train.online", bool, "compute target/reference outputs live (no cache needed)"),
    "--scale-epochs-by-k": ("train.scale_epochs_by_k", bool, "multiply epochs by 1/k (official)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other user error: one line, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_config_flags(parser: argparse.ArgumentParser, flags: list[str]) -> None:
    parser.add_argument("--config", help="YAML config file (flags override it)")
    for flag in flags:
        key, kind, text = CONFIG_FLAGS[flag]
        if kind is bool:  # a bare switch; absent means "as the config says"
            parser.add_argument(flag, dest=key, action="store_const", const=True, default=None,
                                help=text)
        else:
            parser.add_argument(flag, dest=key, type=kind, default=None, help=text)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    return load_config(args.config, overrides)


def _quiet_libraries() -> None:
    """Library warnings (hub retries, load reports) would bury our one-line errors."""
    import logging

    for name in ("huggingface_hub", "transformers", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as tf_logging

        hub_logging.set_verbosity_error()
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()  # "Loading weights" bars; ours say what runs
    except ImportError:
        pass


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a CLI main; user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        code = main(argv)
    except (UserError, CacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
