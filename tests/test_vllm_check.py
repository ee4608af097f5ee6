"""bench/vllm_check.sh's project side, without vLLM: prepare.py on tiny models (prompt ids as
adaspec-eval makes them, adaspec's outputs and counts), merge.py on a fake vLLM result, and
engine.py's counter arithmetic and layout (its own environment has no adaspec)."""

from __future__ import annotations

import ast
import importlib.util
import json
from types import SimpleNamespace

import pytest
from helpers import REPO

from adaspec import evaluate as evaluate_module
from bench.vllm_check import merge, prepare

ENGINE = REPO / "bench" / "vllm_check" / "engine.py"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir, one_thread):
    """prepare() on the tiny target with its first layer as draft (raw prompts: no chat
    template in the tiny tokenizer)."""
    work = tmp_path_factory.mktemp("vllm_check")
    out = prepare.prepare(f"{tiny_model_dir}@layers=1", work, str(tiny_model_dir), "arith",
                          prompts=3, max_new_tokens=5, gamma=2, chat_template=False)
    return work, out


def test_prompt_ids_are_adaspec_evals(prepared, tiny_model_dir, tiny_tokenizer):
    work, out = prepared
    ids = json.loads((work / prepare.PROMPTS_FILE).read_text())["prompt_token_ids"]
    cfg = prepare.eval_config(str(tiny_model_dir), "arith", 3, 5, 2, chat_template=False)
    assert ids == [p[0].tolist() for p in evaluate_module.split_prompts(cfg, tiny_tokenizer, 3)]
    # The chat template changes the ids, the same way adaspec-eval's --chat-template does.
    tiny_tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
    try:
        cfg = prepare.eval_config(str(tiny_model_dir), "arith", 3, 5, 2, chat_template=True)
        templated = prepare.prompt_token_ids(cfg, tiny_tokenizer)
        assert templated == [p[0].tolist()
                             for p in evaluate_module.split_prompts(cfg, tiny_tokenizer, 3)]
        assert templated != ids
    finally:
        tiny_tokenizer.chat_template = None
    assert (work / prepare.TARGET_DIR / "config.json").is_file()
    assert out["eval_prompts_match"], "adaspec-eval decoded other prompts"
    assert len(out["outputs"]["target_only"]) == 3
    # Greedy speculative decoding reproduces the target's own greedy output.
    assert out["outputs"]["speculative"] == out["outputs"]["target_only"]
    assert out["command"].startswith("adaspec-eval --task arith --split test")


def fake_vllm(outputs: list[list[int]], n: int) -> dict:
    """engine.py's JSON for batch 1 and batch n, vLLM reproducing `outputs` except for prompt 0
    of the speculative run at batch n; 3 rounds, speculative twice as fast at batch 1."""
    changed = [[*outputs[0][:-1], outputs[0][-1] + 1], *outputs[1:]]
    tokens = sum(len(o) for o in outputs)
    spec = {"num_drafts": 10, "num_draft_tokens": 20, "num_accepted_tokens": 5,
            "num_accepted_tokens_per_pos": [4, 1]}
    runs = []
    for batch, spec_out in ((1, outputs), (n, changed)):
        runs.append({
            "batch_size": batch, "deterministic": True,
            "target_only": {"tokens": [tokens] * 3, "seconds": [1.0, 2.0, 1.0],
                            "outputs": outputs},
            "speculative": {"tokens": [tokens] * 3, "seconds": [0.5, 1.0, 0.4],
                            "outputs": spec_out, "spec_decode": spec},
        })
    return {"rounds": 3, "engine": {"dtype": "float32"}, "versions": {"vllm": "0.0"},
            "runs": runs, "seconds": {"vllm_rounds": 1.0}}


def test_merge_summarises_a_fake_vllm_run(prepared, tmp_path, capsys):
    work, adaspec = prepared
    outputs = adaspec["outputs"]["target_only"]
    vllm = fake_vllm(outputs, len(outputs))
    (tmp_path / "vllm.json").write_text(json.dumps(vllm))
    out = tmp_path / "result.json"
    assert merge.main(["--prompts", str(work / prepare.PROMPTS_FILE),
                       "--adaspec", str(work / prepare.ADASPEC_FILE),
                       "--vllm", str(tmp_path / "vllm.json"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "vllm"
    one, all_ = result["batches"]["1"], result["batches"]["3"]
    assert one["identical"] == {"vllm_speculative_vs_vllm_target": 3,
                                "vllm_target_vs_adaspec_target": 3,
                                "vllm_speculative_vs_adaspec_target": 3,
                                "adaspec_speculative_vs_adaspec_target": 3}
    assert all_["identical"]["vllm_speculative_vs_vllm_target"] == 2
    assert all_["per_prompt"][0]["first_difference_vllm_speculative_vs_adaspec_target"] == (
        len(outputs[0]) - 1)
    assert one["vllm_mean_accepted_length"] == pytest.approx(1.5)
    ours = adaspec["eval"]["mean_accepted_length"]
    assert one["adaspec_mean_accepted_length"] == ours
    assert one["difference"] == pytest.approx(1.5 - ours)
    assert one["within_tolerance"] == (abs(1.5 - ours) <= merge.TOLERANCE)
    assert one["speed"]["speedup"] == pytest.approx(2.0)  # ratios 2, 2, 2.5
    assert one["speed"]["speedup_spread"] == pytest.approx(0.5)
    assert not result["check"]["outputs_identical"] and not result["check"]["passed"]
    assert result["settings"]["prompt_lengths"] == [
        len(p) for p in json.loads((work / prepare.PROMPTS_FILE).read_text())["prompt_token_ids"]]
    printed = capsys.readouterr().out
    assert "spec=target vLLM" in printed and "check FAILED" in printed


def load_engine():
    spec = importlib.util.spec_from_file_location("vllm_check_engine", ENGINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # vLLM is imported inside main() only
    return module


def test_engine_counters_and_layout():
    engine = load_engine()
    metrics = [SimpleNamespace(name="vllm:spec_decode_num_drafts", value=7),
               SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=3),
               SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos",
                               values=[2, 1, 0]),
               SimpleNamespace(name="vllm:num_requests_running", value=1)]
    llm = SimpleNamespace(get_metrics=lambda: metrics)
    after = engine.counters(llm)
    assert after == {"num_drafts": 7, "num_draft_tokens": 0, "num_accepted_tokens": 3,
                     "num_accepted_tokens_per_pos": [2, 1, 0]}
    before = {"num_drafts": 2, "num_draft_tokens": 0, "num_accepted_tokens": 1,
              "num_accepted_tokens_per_pos": [1]}
    assert engine.difference(after, before)["num_accepted_tokens_per_pos"] == [1, 1, 0]
    # vLLM's environment has no adaspec, and its spawned engine re-imports the script.
    tree = ast.parse(ENGINE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import)
                              else [SimpleNamespace(name=node.module or "")])}
    assert not imported & {"adaspec", "bench", "cache_tools"}
    assert any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in tree.body)
