"""adaspec-export: a run's draft as a folder that transformers (and vLLM, SGLang) take as is."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import yaml
from helpers import make_tiny_model, make_tiny_tokenizer

from adaspec.cli.common import run
from adaspec.cli.export import main as export_main
from adaspec.config import RUN_SECTIONS, Config
from adaspec.export import export_draft, fill_padding_rows

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA_ROWS = 20  # the padded target's embedding rows past its tokenizer (Pythia, Qwen style)
PROMPTS = ["How many clips did Natalia sell?", "def first_repeated_char(str1):",
           "Give three tips for staying healthy."]


def _tied_model(vocab_size: int, seed: int):
    """A tiny Llama whose head is its input embedding (SmolLM2 style)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _make_run(path, model, tokenizer, target, validation=True):
    """A folder laid out like adaspec-train's output: model/, config.yaml, metrics.jsonl."""
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    cfg = Config()
    cfg.models.target, cfg.models.draft = str(target), "tiny-target@layers=1"
    cfg.data.task, cfg.train.k, cfg.train.epochs = "arith", 0.4, 2.0
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(RUN_SECTIONS), sort_keys=False))
    lines = [{"step": 1, "epoch": 0.5, "loss": 1.0}]
    if validation:
        for step, (low, high, agree) in ((2, (0.41, 0.45, 0.5)), (4, (0.52, 0.56, 0.6))):
            lines.append({"step": step, "epoch": step / 2, "validation": {
                "split": "validation", "expected_acceptance_lower": low,
                "expected_acceptance_upper": high, "expected_acceptance": (low + high) / 2,
                "greedy_agreement": agree, "label_tokens": 100}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def padded_target(tmp_path_factory, tiny_tokenizer):
    """A target whose config.vocab_size (embedding rows) exceeds its tokenizer's ids."""
    path = tmp_path_factory.mktemp("padded_target")
    make_tiny_model(len(tiny_tokenizer) + EXTRA_ROWS, n_layers=2, seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer, padded_target):
    draft = make_tiny_model(len(tiny_tokenizer), n_layers=1, seed=2)
    return _make_run(tmp_path_factory.mktemp("run"), draft, tiny_tokenizer, padded_target)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "draft"
    return export_draft(str(run_dir), out), out


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _greedy_real(model, tokenizer, real):
    """Argmax over the real vocabulary of every position of every prompt."""
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0, :, :real].argmax(-1)
                for p in PROMPTS]


def test_export_has_the_targets_vocab_size_and_loads_from_the_folder_alone(
        exported, padded_target, tiny_tokenizer):
    result, out = exported
    real = len(tiny_tokenizer)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    model, tokenizer = _load(out)
    target, _ = _load(padded_target)
    assert model.config.vocab_size == target.config.vocab_size == real + EXTRA_ROWS
    assert model.get_output_embeddings().weight.shape[0] == real + EXTRA_ROWS
    assert (result.rows, result.rows_before, result.real_vocab) == (real + EXTRA_ROWS, real, real)
    assert len(tokenizer) == real and tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.generation_config, name) == getattr(target.generation_config, name)


def test_export_keeps_the_drafts_greedy_tokens_on_the_real_vocabulary(exported, run_dir,
                                                                       tiny_tokenizer):
    _, out = exported
    real = len(tiny_tokenizer)
    before, tokenizer = _load(run_dir / "model")
    after, _ = _load(out)
    for a, b in zip(_greedy_real(before, tokenizer, real), _greedy_real(after, tokenizer, real),
                    strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # over all rows too: a padded row never wins
        for p in PROMPTS:
            assert int(after(**tokenizer(p, return_tensors="pt")).logits.argmax(-1).max()) < real


def test_exported_draft_works_as_assistant_model(exported, padded_target, capsys):
    result, out = exported
    draft, tokenizer = _load(out)
    target, _ = _load(padded_target)
    for prompt in PROMPTS:
        x = tokenizer(prompt, return_tensors="pt")
        plain = target.generate(**x, do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assisted = target.generate(**x, assistant_model=draft, do_sample=False,
                                   max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(plain, assisted)
    # The printed command is a working program: run its Python code here.
    argv = shlex.split(result.command)
    assert argv[:2] == ["python", "-c"]
    exec(argv[2], {})
    assert capsys.readouterr().out.strip()


def test_padding_rows_never_beat_the_real_rows():
    """Real logits all negative (hidden state opposite to every row): a zero row would win with
    logit 0; a mean row's logit is the mean of the real ones and cannot."""
    torch.manual_seed(0)
    real, rows, hidden = 50, 56, 8
    direction = torch.randn(hidden)
    weight = torch.zeros(rows, hidden)
    weight[:real] = direction + 0.1 * torch.randn(real, hidden)
    fill_padding_rows(weight, real)
    states = torch.cat([-direction.unsqueeze(0), torch.randn(500, hidden)])
    logits = states @ weight.T
    assert (logits[0, :real] < 0).all()  # the case zero rows get wrong
    assert (logits[:, real:].max(-1).values <= logits[:, :real].max(-1).values).all()
    assert (logits.argmax(-1) < real).all()


def test_tied_embedding_draft_exports_and_reloads_with_identical_outputs(
        tmp_path, tiny_tokenizer, padded_target):
    from safetensors import safe_open

    real = len(tiny_tokenizer)
    draft = _tied_model(real, seed=3)
    run_dir = _make_run(tmp_path / "run", draft, tiny_tokenizer, padded_target, validation=False)
    export_draft(str(run_dir), tmp_path / "out")
    before, tokenizer = _load(run_dir / "model")
    after, _ = _load(tmp_path / "out")
    head, embed = after.get_output_embeddings().weight, after.get_input_embeddings().weight
    assert after.config.tie_word_embeddings and head.data_ptr() == embed.data_ptr()
    assert head.shape[0] == real + EXTRA_ROWS
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # stored once, as the embedding
    with torch.no_grad():
        for p in PROMPTS:
            x = tokenizer(p, return_tensors="pt")
            a, b = before(**x).logits, after(**x).logits
            assert torch.allclose(a, b[..., :real], atol=1e-6, rtol=0)


def test_best_exports_the_best_epoch_model(tmp_path, tiny_tokenizer, padded_target):
    real = len(tiny_tokenizer)
    run_dir = _make_run(tmp_path / "run", make_tiny_model(real, n_layers=1, seed=5),
                        tiny_tokenizer, padded_target)
    best = make_tiny_model(real, n_layers=1, seed=6)
    best.save_pretrained(run_dir / "best")
    tiny_tokenizer.save_pretrained(run_dir / "best")
    (run_dir / "best" / "best.json").write_text(json.dumps(
        {"step": 2, "epoch": 1.0, "expected_acceptance": 0.43}))
    result = export_draft(str(run_dir), tmp_path / "out", best=True)
    assert result.draft == str(run_dir / "best")
    after, _ = _load(tmp_path / "out")
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(after.get_parameter(weight), best.get_parameter(weight))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "This is the best-epoch model (`best/`): step 2" in card


def test_model_card_is_yaml_front_matter_and_markdown(exported):
    _, out = exported
    lines = (out / "README.md").read_text().splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    meta = yaml.safe_load("\n".join(lines[1:end]))
    body = "\n".join(lines[end + 1:])
    assert meta["base_model"] == "tiny-target@layers=1"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["speculative-decoding", "draft-model", "adaspec"]
    assert (meta["stage"], meta["k"], meta["epochs"], meta["divergence"], meta["task"]) == (
        "draft", 0.4, 2.0, "fkl", "arith")
    assert meta["cache"] == {"sparse": "sample", "draws": 8, "value_encoding": "uint8q"}
    assert body.lstrip().startswith("# ")
    for text in ("## How it was trained", "## Acceptance", "| 4 (best) | 2.00 | validation | "
                 "0.5400 [0.5200, 0.5600] | 0.6000 |", "assistant_model=draft",
                 '"method": "draft_model"', "--speculative-algorithm STANDALONE",
                 "--speculative-draft-model-path"):
        assert text in body, text


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed (save_pretrained's progress bars)
    with pytest.raises(SystemExit) as exit_info:
        run(export_main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_refuses_a_draft_with_another_tokenizer(tmp_path, padded_target, capsys):
    other = make_tiny_tokenizer(vocab_size=280)
    draft = make_tiny_model(len(other), n_layers=1, seed=4)
    run_dir = _make_run(tmp_path / "run", draft, other, padded_target, validation=False)
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "another tokenizer" in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_out_and_a_run_without_model(tmp_path, run_dir, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "full")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    # --overwrite replaces only an earlier export, never another folder (a cache, say)
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "full"), "--overwrite"], capsys)
    assert code == 2 and "not an earlier export" in err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    code, _, err = _cli([str(run_dir), "--out", str(tmp_path / "e"), "--overwrite"], capsys)
    assert code == 0, err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("models: {}\n")
    code, _, err = _cli([str(tmp_path / "unfinished"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no model/" in err


def test_cli_exports_with_eval_json_and_prints_the_transformers_command(
        tmp_path, run_dir, padded_target, capsys):
    evaluation = {"task": "arith", "split": "test", "draft": str(run_dir), "gamma": 4,
                  "temperature": 0.0,
                  "exact": {"expected_acceptance": 0.61, "greedy_agreement": 0.7,
                            "label_tokens": 50},
                  "n_prompts": 3,
                  "speculative": {"alpha_paper": 0.66, "draft_acceptance_rate_vllm": 0.5,
                                  "mean_accepted_length": 2.5, "speedup": 1.4,
                                  "speedup_spread": 0.1}}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    out = tmp_path / "served"
    argv = [str(run_dir), "--target", str(padded_target), "--out", str(out), "--eval-json",
            str(tmp_path / "eval.json"), "--dtype", "bfloat16"]
    code, stdout, _ = _cli(argv, capsys)
    assert code == 0
    assert stdout.strip().splitlines()[-1].startswith("python -c ")
    card = (out / "README.md").read_text()
    assert "expected acceptance 0.6100" in card and "mean accepted length 2.500" in card
    assert "--speculative-num-steps 4 --speculative-eagle-topk 1" in card
    assert '"num_speculative_tokens": 4' in card
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_reduced_vocabulary_draft_exports_with_its_token_maps(tmp_path, tiny_tokenizer,
                                                              padded_target):
    """A --draft-vocab draft (tied embeddings, as SmolLM2) exports as a plain full-vocabulary
    folder that transformers loads alone and uses as assistant_model; the map is there in
    SGLang's and EAGLE-3's formats, and adaspec loads the folder back to the reduced head."""
    from adaspec import draft_vocab, models

    real = len(tiny_tokenizer)
    draft = _tied_model(real, seed=5)
    ids = sorted(torch.randperm(real, generator=torch.Generator().manual_seed(3))[:60].tolist())
    draft_vocab.reduce_head(draft, torch.tensor(sorted(set(ids) | {0})))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    models.save_model(draft, tiny_tokenizer, run / "model")
    _make_run(run, models.load_model(str(run / "model"))[0], tiny_tokenizer, padded_target)
    models.save_model(draft, tiny_tokenizer, run / "model")  # _make_run saved it plainly
    result, out = export_draft(str(run), tmp_path / "export"), tmp_path / "export"
    assert any("reduced-vocabulary" in note for note in result.notes)
    mapped = sorted(set(ids) | {0})
    hot = torch.load(out / draft_vocab.SGLANG_MAP_FILE, weights_only=True)
    assert hot.dtype == torch.int64 and hot.tolist() == mapped
    d2t = json.loads((out / draft_vocab.D2T_FILE).read_text())
    assert [i + d for i, d in enumerate(d2t)] == mapped
    served, tokenizer = _load(out)
    assert served.get_output_embeddings().weight.shape[0] == real + EXTRA_ROWS
    assert not served.config.tie_word_embeddings
    ours, _ = models.load_model(str(out))
    assert draft_vocab.reduced_head_of(ours).ids.tolist() == mapped
    target, _ = _load(padded_target)
    for prompt in PROMPTS:
        x = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            a = served(**x).logits[0, :, :real]
            b = draft(**x).logits[0]
        assert torch.equal(a.argmax(-1), b.argmax(-1))  # only mapped ids win
        assert set(a.argmax(-1).tolist()) <= set(mapped)
        plain = target.generate(**x, do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assisted = target.generate(**x, assistant_model=served, do_sample=False,
                                   max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(plain, assisted)
