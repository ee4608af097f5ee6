"""adaspec-export --format gguf: a draft llama.cpp takes as -md for its target, checked without
llama.cpp (bench/llamacpp_check.sh runs it in the engine)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml
from helpers import make_tiny_model, make_tiny_tokenizer

from adaspec.cli.common import run
from adaspec.cli.export import main as export_main
from adaspec.config import RUN_SECTIONS, Config
from adaspec.export import export_draft
from adaspec.export_gguf import GGUF_FILE, export_gguf, load_gguf_draft, permute_rope

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA_ROWS = 20  # the padded target's embedding rows past its tokenizer
PROMPTS = ["How many clips did Natalia sell?", "def first_repeated_char(str1):",
           "Give three tips for staying healthy."]


def _tied_model(vocab_size: int, seed: int, **extra):
    """A tiny Llama whose head is its input embedding (SmolLM2 style)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, tie_word_embeddings=True, **extra)
    return LlamaForCausalLM(cfg).eval()


def _make_run(path, model, tokenizer, target):
    """A folder laid out like adaspec-train's output (model/ and config.yaml naming the target);
    adaspec's save keeps a reduced head."""
    from adaspec import models

    (path / "model").mkdir(parents=True)
    models.save_model(model, tokenizer, path / "model")
    cfg = Config()
    cfg.models.target, cfg.models.draft = str(target), "tiny-target@layers=1"
    cfg.data.task, cfg.train.k = "arith", 0.4
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(RUN_SECTIONS), sort_keys=False))
    return path


def _reader(folder):
    from gguf import GGUFReader

    return GGUFReader(folder / GGUF_FILE)


def _value(reader, key):
    return reader.fields[key].contents()


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def padded_target(tmp_path_factory, tiny_tokenizer):
    """A target whose config.vocab_size (embedding rows) exceeds its tokenizer's ids."""
    path = tmp_path_factory.mktemp("padded_target")
    make_tiny_model(len(tiny_tokenizer) + EXTRA_ROWS, n_layers=2, seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer, padded_target):
    draft = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=2)
    return _make_run(tmp_path_factory.mktemp("run"), draft, tiny_tokenizer, padded_target)


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """The run exported as a Hugging Face folder, and as GGUF at f32 and q8_0."""
    root = tmp_path_factory.mktemp("exports")
    export_draft(str(run_dir), root / "hf")
    results = {t: export_gguf(str(run_dir), root / t, gguf_type=t) for t in ("f32", "q8_0")}
    return root, results


def test_gguf_holds_the_targets_vocabulary_exactly(exports, tiny_tokenizer):
    """What llama.cpp compares before it takes a draft: vocabulary type, BOS/EOS, size and every
    token's text; built here from the target's HF tokenizer, padded with [PAD<i>] as llama.cpp's
    converter pads a model whose embedding has more rows than the tokenizer has ids."""
    from gguf import TokenType

    root, _ = exports
    reader = _reader(root / "f32")
    real = len(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()
    expected = sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(real, real + EXTRA_ROWS)]
    assert _value(reader, "tokenizer.ggml.tokens") == expected
    types = _value(reader, "tokenizer.ggml.token_type")
    eos = tiny_tokenizer.eos_token_id
    assert types[eos] == TokenType.CONTROL  # <|endoftext|>, a special added token
    assert types[:eos] + types[eos + 1:real] == [TokenType.NORMAL] * (real - 1)
    assert types[real:] == [TokenType.UNUSED] * EXTRA_ROWS
    assert _value(reader, "tokenizer.ggml.model") == "gpt2"
    assert _value(reader, "tokenizer.ggml.eos_token_id") == eos
    assert _value(reader, "tokenizer.ggml.padding_token_id") == tiny_tokenizer.pad_token_id
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(_value(reader, "tokenizer.ggml.merges")) == len(merges) > 0
    assert _value(reader, "llama.vocab_size") == real + EXTRA_ROWS
    embd = {t.name: t for t in reader.tensors}["token_embd.weight"]
    assert [int(n) for n in embd.shape] == [32, real + EXTRA_ROWS]  # ggml order: (n_embd, rows)


def test_tensor_names_are_the_gguf_packages_llama_names_and_norms_stay_f32(exports):
    import gguf

    root, _ = exports
    names = gguf.TENSOR_NAMES
    llama = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]
    expected = {names[t] + ".weight" for t in (gguf.MODEL_TENSOR.TOKEN_EMBD,
                                               gguf.MODEL_TENSOR.OUTPUT_NORM,
                                               gguf.MODEL_TENSOR.OUTPUT)}
    for block in range(2):
        expected |= {names[t].format(bid=block) + ".weight" for t in (
            gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K,
            gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_NORM,
            gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN)}
        assert all(t in llama for t in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.FFN_DOWN))
    for kind, matrix_type in (("f32", "F32"), ("q8_0", "Q8_0")):
        tensors = {t.name: t.tensor_type.name for t in _reader(root / kind).tensors}
        assert set(tensors) == expected
        for name, found in tensors.items():
            assert found == ("F32" if name.endswith("norm.weight") else matrix_type), name
    reader = _reader(root / "q8_0")
    assert _value(reader, "general.architecture") == "llama"
    assert _value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _value(reader, "llama.block_count") == 2
    assert _value(reader, "llama.attention.head_count_kv") == 2


def test_f32_gguf_gives_the_hf_exports_logits(exports, tiny_tokenizer):
    """transformers reads the GGUF back (undoing llama.cpp's q/k permutation): the same logits
    as the Hugging Face export of the same draft, over every row."""
    root, _ = exports
    hf, gguf_draft = _hf(root / "hf"), load_gguf_draft(root / "f32")
    with torch.no_grad():
        for prompt in PROMPTS:
            x = tiny_tokenizer(prompt, return_tensors="pt")
            a, b = hf(**x).logits, gguf_draft(**x).logits
            assert a.shape == b.shape and a.shape[-1] == len(tiny_tokenizer) + EXTRA_ROWS
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_q8_0_weights_are_the_drafts_within_quantization_error(exports):
    root, _ = exports
    hf, q8 = _hf(root / "hf"), load_gguf_draft(root / "q8_0")
    for name, a in hf.named_parameters():
        b = q8.get_parameter(name)
        # Q8_0: a float16 scale d = max|x| / 127 per 32 values: error at most d / 2, plus up to
        # 127 steps of the scale's float16 rounding (2^-11 relative)
        bound = a.detach().abs().max() / 127 * (0.5 + 127 * 2**-11)
        assert (a - b).abs().max() <= bound + 1e-7, name
        if a.dim() == 2:
            assert not torch.equal(a, b), name  # it was quantized


def test_gguf_draft_works_as_assistant_model(exports, padded_target, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    root, _ = exports
    target = AutoModelForCausalLM.from_pretrained(padded_target).eval()
    for kind in ("f32", "q8_0"):
        draft = load_gguf_draft(root / kind)
        for prompt in PROMPTS:
            x = tiny_tokenizer(prompt, return_tensors="pt")
            plain = target.generate(**x, do_sample=False, max_new_tokens=12, min_new_tokens=12)
            assisted = target.generate(**x, assistant_model=draft, do_sample=False,
                                       max_new_tokens=12, min_new_tokens=12)
            assert torch.equal(plain, assisted)


def test_gguf_tokenizer_encodes_like_the_target(exports, tiny_tokenizer):
    """The merges and ids written work as a tokenizer (transformers builds one from the GGUF)."""
    from transformers import AutoTokenizer

    root, _ = exports
    tok = AutoTokenizer.from_pretrained(root / "f32", gguf_file=GGUF_FILE)
    for prompt in PROMPTS + ["<|endoftext|>Natalia  sold 48 clips."]:
        assert tok(prompt).input_ids == tiny_tokenizer(prompt).input_ids


def test_rope_permutation_is_what_transformers_gguf_loader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor()._reverse_permute_weights
    rng = np.random.default_rng(0)
    n_head, n_kv, head_dim, hidden = 6, 2, 8, 12
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    for w, kv in ((q, n_head), (k, n_kv)):
        permuted = permute_rope(w, n_head, kv)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(undo(permuted, n_head, kv), w)
    # llama.cpp pairs (x_2i, x_2i+1) of a head; transformers rotates (x_i, x_i+d/2)
    rows = permute_rope(np.arange(head_dim, dtype=np.float32)[:, None], 1, 1)[:, 0]
    assert rows.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_tied_head_is_stored_once_and_exports_with_identical_logits(tmp_path, tiny_tokenizer,
                                                                    padded_target):
    """A tied head is stored once, as token_embd; transformers (and llama.cpp) tie it back."""
    real = len(tiny_tokenizer)
    draft = _tied_model(real, seed=3)
    run_dir = _make_run(tmp_path / "run", draft, tiny_tokenizer, padded_target)
    export_gguf(str(run_dir), tmp_path / "out", gguf_type="f32")
    names = {t.name for t in _reader(tmp_path / "out").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    loaded = load_gguf_draft(tmp_path / "out")
    assert loaded.config.tie_word_embeddings
    with torch.no_grad():
        for prompt in PROMPTS:
            x = tiny_tokenizer(prompt, return_tensors="pt")
            a, b = draft(**x).logits, loaded(**x).logits[..., :real]
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_reduced_vocabulary_draft_gets_the_targets_full_vocabulary(tmp_path, tiny_tokenizer,
                                                                   padded_target):
    """A --draft-vocab draft: llama.cpp has no token map, so the file holds the target's full
    vocabulary (exactly its size and tokens) and a head whose unmapped rows never win."""
    from transformers import AutoModelForCausalLM

    from adaspec import draft_vocab

    real = len(tiny_tokenizer)
    draft = _tied_model(real, seed=5)
    mapped = sorted(set(torch.randperm(real, generator=torch.Generator().manual_seed(3))[:60]
                        .tolist()) | {0})
    draft_vocab.reduce_head(draft, torch.tensor(mapped))
    run_dir = _make_run(tmp_path / "run", draft, tiny_tokenizer, padded_target)
    result = export_gguf(str(run_dir), tmp_path / "out", gguf_type="f32")
    assert any("reduced-vocabulary" in note for note in result.notes)
    reader = _reader(tmp_path / "out")
    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert len(_value(reader, "tokenizer.ggml.tokens")) == real + EXTRA_ROWS
    assert tensors["output.weight"] == tensors["token_embd.weight"] == [32, real + EXTRA_ROWS]
    served = load_gguf_draft(tmp_path / "out")
    target = AutoModelForCausalLM.from_pretrained(padded_target).eval()
    for prompt in PROMPTS:
        x = tiny_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            a = served(**x).logits[0]
            b = draft(**x).logits[0]
        assert torch.equal(a.argmax(-1), b.argmax(-1))  # only mapped ids win, over all rows
        assert set(a.argmax(-1).tolist()) <= set(mapped)
        plain = target.generate(**x, do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assisted = target.generate(**x, assistant_model=served, do_sample=False,
                                   max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(plain, assisted)


def test_quantized_types_write_their_blocks(tmp_path, run_dir):
    import gguf

    sizes = {}
    for kind in ("bf16", "q4_0"):
        export_gguf(str(run_dir), tmp_path / kind, gguf_type=kind)
        reader = _reader(tmp_path / kind)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.ffn_down.weight"] == kind.upper()
        assert types["blk.0.attn_norm.weight"] == "F32"
        sizes[kind] = (tmp_path / kind / GGUF_FILE).stat().st_size
        assert _value(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert sizes["q4_0"] < sizes["bf16"]


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(export_main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_refuses_a_draft_with_another_tokenizer_in_one_line(tmp_path, padded_target, capsys):
    other = make_tiny_tokenizer(vocab_size=280)
    run_dir = _make_run(tmp_path / "run", make_tiny_model(len(other), n_layers=1, seed=4),
                        other, padded_target)
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "out"), "--format", "gguf"],
                        capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "another tokenizer" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left


def test_cli_flags_and_summary(tmp_path, run_dir, capsys):
    out = str(tmp_path / "out")
    for argv, message in (([str(run_dir), "--out", out, "--gguf-type", "q8_0"], "--format gguf"),
                          ([str(run_dir), "--out", out, "--format", "gguf", "--dtype", "float16"],
                           "--gguf-type")):
        code, _, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    code, stdout, err = _cli([str(run_dir), "--out", out, "--format", "gguf", "--gguf-type",
                              "q4_0"], capsys)
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("llama-server -m ") and f"-md {out}/{GGUF_FILE}" in last
    assert "--spec-type draft-simple" in last
    card = (tmp_path / "out" / "README.md").read_text()
    for text in ("q4_0", "llama-speculative-simple", "--spec-draft-n-max 5",
                 f'gguf_file="{GGUF_FILE}"', "TARGET.gguf"):
        assert text in card, text
    assert json.loads((tmp_path / "out" / "adaspec-export.json").read_text())["format"] == "gguf"


def test_non_llama_and_biased_drafts_are_refused_in_one_line(tmp_path, tiny_tokenizer,
                                                             padded_target, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from adaspec.errors import UserError
    from adaspec.export_gguf import write_gguf

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UserError, match="Llama drafts only"):
        write_gguf(tmp_path / "x.gguf", Qwen2ForCausalLM(cfg), 64, {}, "f32", "x")
    assert not (tmp_path / "x.gguf").exists()
    biased = _tied_model(len(tiny_tokenizer), seed=3, attention_bias=True)
    run_dir = _make_run(tmp_path / "run", biased, tiny_tokenizer, padded_target)
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "out"), "--format", "gguf"],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "biases" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The embedded target (a GGUF) and a reduced-vocabulary draft of its first 2 layers


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A reduced-vocabulary run of the embedded model's first 2 layers, exported as an HF folder
    and as GGUF at f32 and q8_0; the target; 3 arith test prompts (chat template)."""
    from adaspec import draft_vocab, models, tasks

    root = tmp_path_factory.mktemp("embedded")
    target, tokenizer = models.load_model(models.DEFAULT_ALIAS)
    draft = models.keep_first_layers(copy.deepcopy(target), 2).eval()
    examples = tasks.load_examples("arith", "test", None, 3)
    prompts = [tasks.render(ex, tokenizer, chat_template=True)[0] for ex in examples]
    used = {i for p in prompts for i in tokenizer(p).input_ids}
    ids = sorted(used | set(range(2048)) | {tokenizer.eos_token_id})
    draft_vocab.reduce_head(draft, torch.tensor(ids))
    run_dir = _make_run(root / "run", draft, tokenizer, models.DEFAULT_ALIAS)
    export_draft(str(run_dir), root / "hf")
    for kind in ("f32", "q8_0"):
        export_gguf(str(run_dir), root / kind, gguf_type=kind)
    return root, target, tokenizer, prompts


@pytest.mark.slow
def test_embedded_draft_gguf_has_the_target_gguf_tokenizer_byte_for_byte(embedded):
    from gguf import GGUFReader

    from adaspec import models

    root, _, _, _ = embedded
    target = GGUFReader(models.smollm2_gguf_path())
    draft = _reader(root / "q8_0")
    keys = sorted(k for k in target.fields if k.startswith("tokenizer."))
    assert "tokenizer.ggml.tokens" in keys and "tokenizer.ggml.merges" in keys
    assert sorted(k for k in draft.fields if k.startswith("tokenizer.")) == keys
    for key in keys:
        a, b = target.fields[key], draft.fields[key]
        assert a.types == b.types, key
        assert [bytes(a.parts[i]) for i in a.data] == [bytes(b.parts[i]) for i in b.data], key
    assert _value(draft, "llama.vocab_size") == _value(target, "llama.vocab_size") == 49152
    rows = {t.name: int(t.shape[-1]) for t in draft.tensors}
    assert rows["output.weight"] == rows["token_embd.weight"] == 49152


@pytest.mark.slow
def test_embedded_draft_gguf_matches_the_hf_export_on_real_prompts(embedded):
    """f32: the HF export's logits; q8_0: its greedy tokens at every position of the prompts but
    near-ties (measured: 98.5% of positions of 8 prompts agree, every flip at a top-2 gap under
    0.05 logit); as transformers' assistant_model the q8_0 draft leaves the target's output
    unchanged."""
    root, target, tokenizer, prompts = embedded
    hf = _hf(root / "hf")
    f32, q8 = load_gguf_draft(root / "f32"), load_gguf_draft(root / "q8_0")
    positions = agreed = 0
    for prompt in prompts:
        x = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            a, b, c = hf(**x).logits[0], f32(**x).logits[0], q8(**x).logits[0]
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        flipped = a.argmax(-1) != c.argmax(-1)
        top2 = a.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        # a flip is possible only where q8_0 moved the logits by half the f32 gap or more
        moved = (c - a).abs().max(-1).values
        assert (gap[flipped] <= 2 * moved[flipped]).all()
        assert (gap[flipped] < 0.1).all()  # and only near-ties flip here
        positions, agreed = positions + len(flipped), agreed + int((~flipped).sum())
    assert agreed / positions >= 0.95
    for prompt in prompts[:2]:
        x = tokenizer(prompt, return_tensors="pt")
        plain = target.generate(**x, do_sample=False, max_new_tokens=24, min_new_tokens=24)
        assisted = target.generate(**x, assistant_model=q8, do_sample=False, max_new_tokens=24,
                                   min_new_tokens=24)
        assert torch.equal(plain, assisted)
