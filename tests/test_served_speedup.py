"""studies/served_speedup.py's pure parts: the extend-until-plateau decision, a path's prediction
and break-even arithmetic, the targets, vLLM's numbers read from bench/vllm_check's JSON, and the
report on a synthetic payload. (Its whole run is the `# smoke` command in studies/README.md.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from studies import served_speedup as ss


def _curve(values: list[float], every: int = 10) -> list[dict]:
    return [{"step": every * (i + 1), "greedy_agreement": v} for i, v in enumerate(values)]


def test_a_rising_curve_is_extended_by_a_chunk_up_to_the_cap():
    rising = _curve([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95])
    d = ss.next_chunk(rising, 3.0, 3.0, 18.0)
    assert d["action"] == "extend" and d["epochs"] == 6.0 and not d["plateau"]["reached"]
    assert ss.next_chunk(rising, 16.0, 3.0, 18.0)["epochs"] == 18.0  # never past the cap
    capped = ss.next_chunk(rising, 18.0, 3.0, 18.0)
    assert capped["action"] == "cap" and capped["epochs"] == 18.0


def test_a_flat_curve_stops_even_with_one_lucky_evaluation():
    flat = _curve([0.5, 0.7, 0.9, 0.91, 0.90, 0.91, 0.90, 0.96])
    # the mean of the last quarter (0.90, 0.96) minus the quarter before (0.91, 0.90) is 2.5 pt:
    # one lucky evaluation is not a plateau ...
    assert ss.next_chunk(flat, 6.0, 3.0, 18.0)["action"] == "extend"
    flatter = _curve([0.5, 0.7, 0.9, 0.91, 0.90, 0.91, 0.91, 0.90])
    d = ss.next_chunk(flatter, 6.0, 3.0, 18.0)
    assert d["action"] == "plateau" and d["epochs"] == 6.0
    assert d["plateau"]["change"] == pytest.approx(0.0, abs=1e-9)


def test_no_curve_means_train_more():
    assert ss.next_chunk([], 3.0, 3.0, 18.0)["action"] == "extend"


def test_a_path_result_puts_the_prediction_beside_the_measurement():
    speed = {"speedup": 2.0, "speedup_min": 1.8, "speedup_max": 2.1,
             "speculative_tokens_per_s": 40.0, "target_tokens_per_s": 20.0}
    at_least = [0.9, 0.8, 0.7, 0.6]
    r = ss.path_result(speed, 1 + sum(at_least), 0.1, {"1": 1.1, "4": 1.5}, 4,
                       identical={"prompts": 8, "identical": 8, "against": "x"})
    assert r["accepted_length"] == pytest.approx(4.0)
    assert r["step_cost"] == pytest.approx(1.9)  # 4 x 0.1 + 1.5
    assert r["predicted_speedup"] == pytest.approx(4.0 / 1.9)
    assert r["predicted_minus_measured_rel"] == pytest.approx((4.0 / 1.9 - 2.0) / 2.0)
    assert (r["c"], r["v"], r["gamma"]) == (0.1, 1.5, 4)
    be = r["break_even"]
    assert be["1x"]["accepted_length_needed"] == pytest.approx(1.9)
    assert be["2x"]["accepted_length_needed"] == pytest.approx(3.8)
    # with 4 tokens per step, 2x needs a step of 2.0: c = (2.0 - 1.5) / 4, or v = 2.0 - 0.4
    assert be["2x"]["c_needed"] == pytest.approx(0.125)
    assert be["2x"]["v_needed"] == pytest.approx(1.6)
    # at the break-even values the prediction is the goal exactly
    for goal, key in ((1.0, "1x"), (1.5, "1.5x"), (2.0, "2x")):
        c = be[key]["c_needed"]
        assert 4.0 / (4 * c + 1.5) == pytest.approx(goal)


def _path(speedup: float, low: float, predicted_rel: float = 0.0, identical: int = 8) -> dict:
    return {"speedup": speedup, "speedup_min": low, "speedup_max": speedup + 0.1,
            "predicted_minus_measured_rel": predicted_rel,
            "identical": {"prompts": 8, "identical": identical}}


def test_targets_are_the_issues_done_when():
    paths = {"ours": _path(2.1, 1.9), "assisted": _path(0.9, 0.8, 0.3),
             "vllm": _path(1.6, 1.4, -0.1), "llamacpp": {"measured": False, "reason": "x"}}
    t = ss.targets(paths)
    assert t["ours_at_least_2x"] and t["ours_spread_above_1.5"]
    assert t["an_engine_at_least_1.5x"] and t["engines_measured"] == ["vllm"]
    assert t["predicted_within_15pct"] == {"ours": True, "assisted": False, "vllm": True}
    assert t["identical_everywhere"]
    t = ss.targets({"ours": _path(1.9, 1.4, identical=7)})
    assert not t["ours_at_least_2x"] and not t["ours_spread_above_1.5"]
    assert t["an_engine_at_least_1.5x"] is None and not t["identical_everywhere"]


def test_vllm_numbers_come_from_batch_one_of_the_merged_json():
    merged = {
        "batches": {
            "1": {"prompts": 8, "identical": {"vllm_speculative_vs_vllm_target": 8,
                                              "vllm_target_vs_adaspec_target": 7},
                  "vllm_spec_decode": {"num_drafts": 100, "num_draft_tokens": 400,
                                       "num_accepted_tokens": 300,
                                       "num_accepted_tokens_per_pos": [90, 80, 70, 60]},
                  "vllm_mean_accepted_length": 4.0,
                  "speed": {"speedup": 1.2, "speedup_min": 1.1, "speedup_max": 1.3,
                            "speculative_tokens_per_s": 12.0, "target_tokens_per_s": 10.0}},
            "8": {"speed": {"speedup": 0.9}}},
        "settings": {"engine": {"enforce_eager": True}}, "machine": {"vllm_side": {}},
        "check": {"passed": True}, "seconds": {}}
    costs = {"draft_cost": 0.2, "verify_cost": {"4": 1.4}}
    r = ss.vllm_result(merged, 4, costs)
    assert r["at_least"] == [0.9, 0.8, 0.7, 0.6]
    assert r["accepted_length"] == pytest.approx(4.0) == r["vllm_mean_accepted_length"]
    assert r["predicted_speedup"] == pytest.approx(4.0 / 2.2)
    assert r["identical"]["identical"] == 8 and r["batch_n"] == {"8": {"speedup": 0.9}}


def test_the_report_on_a_synthetic_payload(tmp_path):
    speed = {"speedup": 0.8, "speedup_min": 0.7, "speedup_max": 0.9,
             "speculative_tokens_per_s": 16.0, "target_tokens_per_s": 20.0}
    losing = ss.path_result(speed, 4.0, 0.3, {"4": 1.5}, 4,
                            identical={"prompts": 8, "identical": 8, "against": "x"})
    winning = ss.path_result({**speed, "speedup": 2.1, "speedup_min": 1.9, "speedup_max": 2.2},
                             4.0, 0.08, {"4": 1.5}, 4,
                             identical={"prompts": 8, "identical": 8, "against": "x"})
    curve = _curve([0.5, 0.8, 0.9, 0.9])
    payload = {
        "benchmark": "served_speedup", "machine": {"cpu": "test", "cores": 2},
        "settings": {"target": "t", "draft": "d", "raw_prompts": False, "task": "arith",
                     "draft_vocab": 2048, "train_rows": 320, "max_new_tokens": 64,
                     "val_rows": 8, "prompts": 8, "response_tokens": 48, "cont_tokens": 40,
                     "batch_size": 4, "lr": 3e-4, "note": ["a note"],
                     "eval_every": 20, "chunk_epochs": 3.0, "max_epochs": 18.0},
        "training": {"chunks": [{"epochs": 3.0, "steps": 40, "action": "plateau",
                                 "plateau": {"change": 0.001}}],
                     "best": {"step": 30, "greedy_agreement": 0.9}, "outcome": "plateau",
                     "plateau": {"reached": True, "change": 0.001}, "steps_done": 40,
                     "seconds": 600.0, "validation": curve},
        "paths": {"ours": {**winning, "loadavg": [1.0, 1.0, 1.0]}, "vllm": losing,
                  "llamacpp": {"measured": False, "reason": "not built"}},
    }
    args = SimpleNamespace(doc=str(tmp_path / "doc.md"), out=str(tmp_path / "r.json"))
    ss.report(args, payload)
    text = (tmp_path / "doc.md").read_text()
    assert (tmp_path / "doc.png").is_file() and (tmp_path / "r.json").is_file()
    assert "**2.10x** (1.90-2.20)" in text and "not measured: not built" in text
    assert "vLLM CPU loses (0.80x)" in text  # the why-it-loses sentence, in its own numbers
    assert "adaspec's decoder >= 2.0x: yes; its spread above 1.5: yes" in text
    assert "a real engine (vLLM CPU or llama.cpp) >= 1.5x: no" in text
    assert "## Notes on this run\n\n- a note" in text
    assert payload["summary"]["predicted_within_15pct"]["vllm"] is False
    assert not math.isnan(payload["paths"]["vllm"]["break_even"]["1x"]["c_needed"])


SPECULATIVE_STDERR = """\
0.15.051.909 I encoded   81 tokens in   10.661 seconds, speed:    7.598 t/s
0.15.051.910 I decoded   17 tokens in    1.125 seconds, speed:   15.116 t/s
0.15.051.910 I
0.15.051.910 I n_draft   = 4
0.15.051.911 I n_predict = 17
0.15.051.911 I n_drafted = 13
0.15.051.911 I n_accept  = 13
0.15.051.911 I accept    = 100.000%
0.15.052.122 I common_perf_print: prompt eval time =   11586.76 ms /    99 tokens (  117.04 ms \
per token,     8.54 tokens per second)
"""
COMPLETION_STDERR = """\
7.05.633.484 I common_perf_print: prompt eval time =    8845.02 ms /    81 tokens (  109.20 ms \
per token,     9.16 tokens per second)
7.05.633.485 I common_perf_print:        eval time =  4135.58 ms /    63 runs   (   65.64 ms \
per token,    15.23 tokens per second)
"""


def test_llamacpp_counts_and_times_are_read_from_its_own_lines():
    one = ss.parse_speculative(SPECULATIVE_STDERR)
    # 17 tokens, 13 of them accepted drafts: 4 steps (each adds one token of the target's)
    assert one == {"tokens": 17, "seconds": 1.125, "n_predict": 17, "n_drafted": 13,
                   "n_accept": 13, "steps": 4}
    # the decoding's eval line, not the prompt's
    assert ss.parse_completion(COMPLETION_STDERR) == {"tokens": 63, "seconds": 4.13558}
    with pytest.raises(RuntimeError, match="eval time"):
        ss.parse_completion("nothing here")


def test_outputs_agree_up_to_the_shorter():
    assert ss.same_prefix("2 + 3 = 5. The answer", "2 + 3 = 5")
    # the tool's closing newlines after a shorter output are not a difference
    assert ss.same_prefix("Maya's age = 8 -\n\n\n", "Maya's age = 8 - 3 = \n\n\n")
    assert not ss.same_prefix("2 + 3 = 6", "2 + 3 = 5. The answer")
