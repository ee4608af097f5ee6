"""Plain helpers shared by the test modules; the shared fixtures live in conftest.py.

Test modules import these by name (`from helpers import GSM8K, train_config`): pytest puts tests/
on sys.path, as it does for conftest.py (tests/ has no __init__.py). No test module imports from
another test module, and none imports conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
CHAT_FIXTURES = REPO / "tests" / "fixtures" / "chat"  # conversations in both shapes (task chat)
# A chat template for the tiny tokenizer: each turn "<role>content<|endoftext|>\n", and the
# generation prompt "<assistant>"; its end of turn is the EOS token.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Tiny models: a byte-level BPE tokenizer and random Llama-architecture causal LMs

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The final answer is: 72",
    "Give three tips for staying healthy. Eat a balanced diet and get enough sleep.",
    "Write a python function to find the first repeated character in a given string.",
    "def first_repeated_char(str1):\n    for index, c in enumerate(str1):\n        return c",
    "Summarize the following article. The prison link project helps people in Wales.",
]


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (so it encodes any text) with about `vocab_size` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_tiny_model(vocab_size: int, n_layers: int = 2, seed: int = 0, hidden: int = 32):
    """A randomly initialised Llama-architecture causal LM, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(path: Path, tokenizer, n_layers: int = 2, seed: int = 0,
                    hidden: int = 32) -> Path:
    """`path` made a save_pretrained folder: a tiny random model sized to `tokenizer`, and it."""
    make_tiny_model(len(tokenizer), n_layers=n_layers, seed=seed, hidden=hidden).save_pretrained(
        path)
    tokenizer.save_pretrained(path)
    return path


def sharpen_lm_head(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Random tiny models are nearly uniform; a larger LM head gives distinct distributions."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


# ---------------------------------------------------------------------------------------------
# Cache builds on the tiny target: 8 gsm8k rows, top-K


def cache_build_config(cache, model_dir, **cache_kw):
    """The settings of a top-8 build of 8 gsm8k rows by the model at `model_dir` into `cache`
    (`cache_kw` overrides the cache section)."""
    from adaspec.config import build_config

    values = {
        "models": {"target": str(model_dir)},
        "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 8, "max_length": 512},
        "cache": {
            "cache": str(cache),
            "topk": 8,
            "sparse": "topk",
            "value_encoding": "float16",
            "shard_rows": 256,
            "chunk_rows": 128,
            "batch_tokens": 512,
            **cache_kw,
        },
    }
    return build_config(values)


def build_cache(cfg, role="target", spec=None):
    """Build one stage of `cfg`'s cache without a progress bar; returns the manifest."""
    from adaspec.build import build_stage

    return build_stage(cfg, role, spec, progress=False)


def stage_file_bytes(root: Path, stages=("sequences", "target")) -> dict[str, bytes]:
    """Every file of the given stages' arrays (chunks, shards and array metadata)."""
    from cache_tools import schema

    out = {}
    for stage in stages:
        base = root / "gsm8k" / "train" / stage
        for path in sorted(base.rglob("*")):
            if path.is_file() and schema.DONE not in path.parts:
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def corrupt_chunks(cache, array: str, only_first: bool = False) -> None:
    """Flip bytes inside stored chunks of target/<array> (every chunk, or chunk 0 only).

    A shard file is its chunks then an index of (offset, nbytes) uint64 pairs per chunk and a
    crc32c; the index says where each chunk's bytes are.
    """
    folder = cache / "gsm8k" / "train" / "target" / array / "c"
    for shard in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = bytearray(shard.read_bytes())
        n_chunks = 2  # shard_rows 256 / chunk_rows 128 in these caches
        index = np.frombuffer(bytes(data[-(16 * n_chunks + 4):-4]), dtype="<u8").reshape(-1, 2)
        for offset, nbytes in index[:1] if only_first else index:
            if offset != 2**64 - 1:  # an empty chunk has no bytes
                for i in range(int(offset) + int(nbytes) // 2, int(offset) + int(nbytes) // 2 + 8):
                    data[i] ^= 0xFF
        shard.write_bytes(bytes(data))
        if only_first:
            return


# ---------------------------------------------------------------------------------------------
# Training on conftest's `env` (a K = V cache of 8 gsm8k rows with a reference)


def train_config(env, cache_values: dict | None = None, ref: str | None = None, **train_values):
    """The settings of a training run on `env`: its target, a 1-layer draft of it, its cache
    (`cache_values` overrides the cache section) and `train_values` over small defaults."""
    from adaspec.config import build_config

    train_values = {"batch_size": 2, "lr": 1e-4, "epochs": 2.0, **train_values}
    if "out" in train_values:
        train_values["out"] = str(train_values["out"])
    return build_config({
        "models": {"target": str(env.target), "draft": f"{env.target}@layers=1", "ref": ref},
        "data": {"task": "gsm8k", "data_files": str(GSM8K), "limit": 8, "max_length": 512},
        "cache": {"cache": str(env.cache), "topk": len(env.tok), "shard_rows": 256,
                  "chunk_rows": 128, "batch_tokens": 1024, "sparse": "topk",
                  "value_encoding": "float16", **(cache_values or {})},
        "train": train_values,
    })


def build_split_target(env, split: str, limit: int, cache_values: dict | None = None):
    """Build the target stage of `limit` rows of `split` of env's data; returns its settings."""
    from adaspec.build import build_stage

    cfg = train_config(env, cache_values)
    cfg.data.split, cfg.data.limit = split, limit
    build_stage(cfg, "target", progress=False)
    return cfg


def run_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, as written."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict a run saved in model/."""
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# The law of sampled tokens: the first two tokens over a small vocabulary, by enumeration

SMALL_VOCAB = 8


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled into one."""
    n = observed.sum()
    expected = expected_probs.double() * n
    small = expected < 5
    obs = torch.cat([observed[~small].double(), observed[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    # chi-square survival function: regularized upper incomplete gamma Q(dof / 2, stat / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0).double(), stat / 2))


def first_two_token_probs(target, prompt: list[int], temperature: float) -> torch.Tensor:
    """Exact law of the first two sampled tokens, by enumeration: (V * V,) float64."""
    v = SMALL_VOCAB
    rows = torch.tensor([[*prompt, x] for x in range(v)])  # (V, T + 1)
    with torch.no_grad():
        logits = target(input_ids=rows).logits.double()  # (V, T + 1, V)
    first = torch.softmax(logits[0, -2, :v] / temperature, dim=-1)  # (V,)
    second = torch.softmax(logits[:, -1, :v] / temperature, dim=-1)  # (V, V)
    return (first[:, None] * second).flatten()


def first_two_token_counts(sample, runs: int) -> torch.Tensor:
    """How often each pair of first two tokens came out of `runs` calls of `sample`: (V * V,)."""
    counts = torch.zeros(SMALL_VOCAB * SMALL_VOCAB, dtype=torch.long)
    for _ in range(runs):
        first, second = sample()[:2].tolist()
        counts[first * SMALL_VOCAB + second] += 1
    return counts


class SpeculativeSampler:
    """Each call: one speculative_generate sample (3 new tokens, gamma 2: the first step drafts 2,
    so rejection at either position counts); `stats` sums the SpecStats of every call."""

    def __init__(self, target, draft, ids: torch.Tensor, temperature: float,
                 generator: torch.Generator):
        from adaspec.speculative import SpecStats

        self.target, self.draft, self.ids = target, draft, ids
        self.temperature, self.generator = temperature, generator
        self.stats = SpecStats()

    def __call__(self) -> torch.Tensor:
        from adaspec.speculative import speculative_generate

        out, stats = speculative_generate(self.target, self.draft, self.ids, 3, 2,
                                          self.temperature, generator=self.generator)
        self.stats = self.stats.merge(stats)
        return out
