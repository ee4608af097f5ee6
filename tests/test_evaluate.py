"""Acceptance three ways on tiny models: offline bounds contain the exact teacher-forced value."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import GSM8K, REPO, make_tiny_model, save_tiny_model

from adaspec import evaluate as evaluate_module
from adaspec import models, speculative
from adaspec.build import build_stage
from adaspec.cli.eval_format import format_table
from adaspec.config import build_config
from adaspec.errors import UserError
from adaspec.evaluate import evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    base = tmp_path_factory.mktemp("eval")
    draft_dir = base / "draft"
    save_tiny_model(draft_dir, tiny_tokenizer, n_layers=1, seed=11)
    values = {
        "models": {"target": str(tiny_model_dir)},
        "data": {"task": "gsm8k", "split": "test", "data_files": str(GSM8K), "limit": 6,
                 "max_length": 512},
        "cache": {"cache": str(base / "cache"), "topk": 16, "shard_rows": 512,
                  "chunk_rows": 256, "sparse": "topk", "value_encoding": "float16"},
    }
    cfg = build_config(values)
    build_stage(cfg, "target", progress=False)
    return cfg, draft_dir


def test_offline_bounds_contain_exact_on_the_same_tokens(setup):
    cfg, draft_dir = setup
    [result] = evaluate(cfg, [str(draft_dir)], ("offline", "exact"), progress=False)
    off, exact = result["offline"], result["exact"]
    assert off["label_tokens"] == exact["label_tokens"] > 100
    # offline numbers say which target they measure agreement with: the cache's
    assert result["cache_target"]["weight_hash"] == models.model_identity(
        cfg.models.target)["weight_hash"]
    assert off["expected_acceptance_lower"] <= exact["expected_acceptance"] + 1e-4
    assert exact["expected_acceptance"] <= off["expected_acceptance_upper"] + 1e-4
    assert off["expected_acceptance_upper"] - off["expected_acceptance_lower"] > 0  # K < V
    # The cached top-1 is the target's argmax (up to float16 ties on a handful of tokens).
    assert abs(off["greedy_agreement"] - exact["greedy_agreement"]) < 0.02


def test_offline_bounds_from_a_sampled_cache_contain_exact(setup, tmp_path):
    cfg, draft_dir = setup
    sampled = dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, cache=str(tmp_path / "sampled"), sparse="sample", draws=16))
    build_stage(sampled, "target", progress=False)
    [result] = evaluate(sampled, [str(draft_dir)], ("offline", "exact"), progress=False)
    off, exact = result["offline"], result["exact"]
    assert off["label_tokens"] == exact["label_tokens"] > 100
    assert off["expected_acceptance_lower"] <= exact["expected_acceptance"] + 1e-4
    assert exact["expected_acceptance"] <= off["expected_acceptance_upper"] + 1e-4
    # 16 draws hold fewer distinct tokens than the top 16: wider bounds, but not vacuous
    [topk] = evaluate(cfg, [str(draft_dir)], ("offline",), progress=False)
    width = off["expected_acceptance_upper"] - off["expected_acceptance_lower"]
    top_width = (topk["offline"]["expected_acceptance_upper"]
                 - topk["offline"]["expected_acceptance_lower"])
    assert top_width < width < 1.0


def test_speculative_reports_the_three_conventions(setup, tmp_path):
    cfg, draft_dir = setup
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "adaspec.cli.eval", "--draft", str(draft_dir),
           "--target", cfg.models.target, "--task", "gsm8k", "--data-files", str(GSM8K),
           "--split", "test", "--cache", cfg.cache.cache, "--modes", "speculative",
           "--prompts", "2", "--max-new-tokens", "12", "--gamma", "3", "--json", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    spec = result["speculative"]
    assert result["gamma"] == 3 and result["n_prompts"] == 2
    assert 0.0 <= spec["alpha_paper"] <= 1.0
    assert spec["accepted"] + spec["rejected"] <= spec["drafted"]
    assert 1.0 <= spec["mean_accepted_length"] <= 4.0
    assert spec["speculative_tokens_per_s"] > 0 and spec["target_tokens_per_s"] > 0
    assert "AdaSPEC paper" in done.stdout and "vLLM" in done.stdout


def test_bad_eval_arguments_are_one_line(setup):
    cfg, draft_dir = setup
    cmd = [sys.executable, "-m", "adaspec.cli.eval", "--draft", str(draft_dir), "--gamma", "0",
           "--task", "gsm8k", "--data-files", str(GSM8K), "--modes", "speculative"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--gamma" in done.stderr.strip().splitlines()[-1]


# --- tokenizer check, modes without a cache -----------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer_draft(setup, tmp_path_factory, tiny_tokenizer):
    """A draft whose tokenizer has the same size but two ids swapped: offline numbers come out,
    and they are nonsense, since the cache's ids mean other tokens."""
    _, draft_dir = setup
    path = tmp_path_factory.mktemp("other_tok")
    make_tiny_model(len(tiny_tokenizer), n_layers=1, seed=13).save_pretrained(path)
    tok_json = json.loads((draft_dir / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    a, b = (t for t in vocab if vocab[t] in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(tok_json))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (draft_dir / name).is_file():
            (path / name).write_text((draft_dir / name).read_text())
    return path


def test_offline_refuses_a_draft_with_another_tokenizer_before_any_number(
    setup, other_tokenizer_draft, monkeypatch
):
    cfg, draft_dir = setup
    computed = []
    original = evaluate_module.offline_acceptance

    def spy(draft, *args, **kwargs):
        computed.append(draft)
        return original(draft, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "offline_acceptance", spy)
    # the good draft first: a check per draft inside the loop would already have scored it
    with pytest.raises(UserError, match="another tokenizer") as err:
        evaluate(cfg, [str(draft_dir), str(other_tokenizer_draft)], ("offline",),
                 progress=False)
    assert str(other_tokenizer_draft) in str(err.value) and "\n" not in str(err.value)
    assert computed == []


def test_default_modes_without_the_cache_split_run_exact_and_speculative(setup, tmp_path):
    """No --modes and a cache without the split: a note, then the modes that need no cache."""
    cfg, draft_dir = setup
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "adaspec.cli.eval", "--draft", str(draft_dir),
           "--target", cfg.models.target, "--task", "gsm8k", "--data-files", str(GSM8K),
           "--split", "train", "--limit", "2", "--cache", cfg.cache.cache, "--prompts", "1",
           "--max-new-tokens", "4", "--gamma", "2", "--json", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "offline" in notes[0] and "gsm8k/train" in notes[0]
    result = json.loads(out.read_text())
    assert "offline" not in result and result["modes"] == ["exact", "speculative"]
    assert result["exact"]["label_tokens"] > 0  # the task's own tokenized sequences
    assert result["speculative"]["new_tokens"] > 0


def test_asking_for_offline_without_a_cache_names_the_fix(setup, tmp_path):
    cfg, draft_dir = setup
    missing = dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, cache=str(tmp_path / "no-cache")))
    with pytest.raises(UserError, match="--modes exact,speculative") as err:
        evaluate(missing, [str(draft_dir)], ("offline", "exact"), progress=False)
    assert "\n" not in str(err.value) and "no-cache" in str(err.value)
    cmd = [sys.executable, "-m", "adaspec.cli.eval", "--draft", str(draft_dir),
           "--task", "gsm8k", "--data-files", str(GSM8K), "--cache", missing.cache.cache,
           "--modes", "offline"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--modes exact,speculative" in done.stderr.strip().splitlines()[-1]


# --- speed: one shared target-only baseline, interleaved rounds, noise flags --------------------


@pytest.fixture(scope="module")
def second_draft(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("draft2"), tiny_tokenizer, n_layers=1, seed=12)


def _spy_decoding(monkeypatch) -> list[tuple]:
    """Record every decoding run as ("target", prompt) or ("spec", draft object id, prompt)."""
    events: list[tuple] = []
    target_generate, speculative_generate = (speculative.target_generate,
                                             speculative.speculative_generate)

    def target_spy(target, input_ids, *args, **kwargs):
        events.append(("target", tuple(input_ids[0].tolist())))
        return target_generate(target, input_ids, *args, **kwargs)

    def spec_spy(target, draft, input_ids, *args, **kwargs):
        events.append(("spec", id(draft), tuple(input_ids[0].tolist())))
        return speculative_generate(target, draft, input_ids, *args, **kwargs)

    monkeypatch.setattr(speculative, "target_generate", target_spy)
    monkeypatch.setattr(speculative, "speculative_generate", spec_spy)
    return events


def test_target_only_runs_once_per_prompt_per_round_whatever_the_drafts(
    setup, second_draft, monkeypatch
):
    cfg, draft_dir = setup
    events = _spy_decoding(monkeypatch)
    args = dict(modes=("speculative",), gamma=2, max_new_tokens=4, n_prompts=2, progress=False)
    [one] = evaluate(cfg, [str(draft_dir)], **args)
    one_events = list(events)
    events.clear()
    two = evaluate(cfg, [str(draft_dir), str(second_draft)], **args)
    rounds, n_prompts = 3, 2  # the default --speed-rounds
    for log in (one_events, events):
        # one untimed warm-up, then each prompt once per round
        assert sum(e[0] == "target" for e in log) == 1 + rounds * n_prompts
    assert sum(e[0] == "spec" for e in events) == 2 * (1 + rounds * n_prompts)

    # warm-up: every path once; then rounds of prompts, each prompt through every path in a row
    paths = 3
    warm, timed = events[:paths], events[paths:]
    assert len({e[:2] for e in warm}) == paths
    blocks = [timed[k:k + paths] for k in range(0, len(timed), paths)]
    assert len(blocks) == rounds * n_prompts
    prompts = []
    for block in blocks:
        assert len({e[:2] for e in block}) == paths  # target-only and both drafts
        assert len({e[-1] for e in block}) == 1  # on the same prompt
        prompts.append(block[0][-1])
    assert prompts == prompts[:n_prompts] * rounds and len(set(prompts)) == n_prompts

    # acceptance counts are those of the decoding itself, the same whoever else is compared
    counts = ("steps", "drafted", "accepted", "rejected", "new_tokens", "alpha_paper")
    assert {k: one["speculative"][k] for k in counts} == {
        k: two[0]["speculative"][k] for k in counts}
    s = two[1]["speculative"]
    assert s["speed_rounds"] == rounds and s["speedup_min"] <= s["speedup"] <= s["speedup_max"]
    assert all(isinstance(r["speculative"]["speed_within_noise"], bool) for r in two)


def test_acceptance_counts_come_from_the_decoding(setup):
    """Greedy decoding is deterministic: the counts equal one direct run per prompt."""
    cfg, draft_dir = setup
    [result] = evaluate(cfg, [str(draft_dir)], ("speculative",), gamma=3, max_new_tokens=6,
                        n_prompts=2, progress=False)
    from adaspec.evaluate import split_prompts

    target, tokenizer = models.load_model(cfg.models.target)
    draft, _ = models.load_model(str(draft_dir))
    total = speculative.SpecStats()
    for prompt in split_prompts(cfg, tokenizer, 2):
        _, stats = speculative.speculative_generate(
            target, draft, prompt, 6, 3, 0.0, tokenizer.eos_token_id, len(tokenizer))
        total = total.merge(stats)
    s = result["speculative"]
    assert (s["steps"], s["drafted"], s["accepted"], s["rejected"], s["new_tokens"]) == (
        total.steps, total.drafted, total.accepted, total.rejected, total.new_tokens)


def test_speed_summary_is_medians_over_rounds():
    from adaspec.statistics import summarize_speed

    # speculative 10, 5, 20 tok/s; target-only 5 tok/s each round: ratios 2, 1, 4
    s = summarize_speed([10, 10, 10], [1.0, 2.0, 0.5], [10, 10, 10], [2.0, 2.0, 2.0])
    assert s["speculative_tokens_per_s"] == 10.0
    assert (s["speculative_tokens_per_s_min"], s["speculative_tokens_per_s_max"]) == (5.0, 20.0)
    assert s["target_tokens_per_s"] == 5.0
    assert (s["speedup"], s["speedup_min"], s["speedup_max"]) == (2.0, 1.0, 4.0)
    assert s["speedup_spread"] == 2.0  # 2 ± 2 holds every round's ratio
    assert s["speed_rounds"] == 3
    # the ratio is paired by round: a slow round slows both paths and cancels out
    paired = summarize_speed([10, 10, 10], [1.0, 4.0, 1.0], [10, 10, 10], [2.0, 8.0, 2.0])
    assert paired["speedup"] == 2.0 and paired["speedup_spread"] == 0.0


def test_speed_noise_flags_and_table():
    from adaspec.statistics import speed_within_noise

    assert speed_within_noise([(0.50, 0.03), (0.54, 0.02), (0.80, 0.02)]) == [True, True, False]
    assert speed_within_noise([(0.50, 0.01), (0.60, 0.01)]) == [False, False]
    assert speed_within_noise([(0.50, 0.30)]) == [False]  # nothing to rank against

    def result(name, speedup, spread, noisy):
        spec = {"alpha_paper": 0.5, "draft_acceptance_rate_vllm": 0.4,
                "mean_accepted_length": 2.0, "speedup": speedup, "speedup_spread": spread,
                "speed_within_noise": noisy, "speed_rounds": 3}
        return {"draft": name, "speculative": spec}

    noisy = format_table([result("a", 0.52, 0.03, True), result("b", 0.55, 0.04, True)])
    assert "| 0.52 ± 0.03 |" in noisy and "| 0.55 ± 0.04 |" in noisy
    assert "speedup differences between drafts are within noise" in noisy.splitlines()[-1]
    clear = format_table([result("a", 0.52, 0.01, False), result("b", 0.75, 0.02, False)])
    assert "within noise" not in clear


def test_speed_rounds_below_three_are_refused(setup):
    cfg, draft_dir = setup
    with pytest.raises(UserError, match="--speed-rounds"):
        evaluate(cfg, [str(draft_dir)], ("speculative",), speed_rounds=2, progress=False)


def test_acceptance_on_the_targets_own_continuations_and_the_iid_prediction(setup, tmp_path):
    """A cache of the target's greedy continuations: offline and exact acceptance on them,
    and the mean accepted length each teacher-forced measure predicts for gamma."""
    cfg, draft_dir = setup
    continuations = dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, cache=str(tmp_path / "cont"), generate=True, gen_temperature=0.0,
        gen_max_new_tokens=12, topk=300))
    build_stage(continuations, "target", progress=False)
    [result] = evaluate(cfg, [str(draft_dir)], ("offline", "exact", "speculative"),
                        progress=False, continuations_cache=str(tmp_path / "cont"), gamma=3,
                        max_new_tokens=12, n_prompts=3)
    off, exact = result["offline_continuations"], result["exact_continuations"]
    assert off["label_tokens"] == exact["label_tokens"] > 0
    # K = V: the offline bounds close on the exact value.
    assert off["expected_acceptance_lower"] == pytest.approx(exact["expected_acceptance"],
                                                             abs=2e-3)
    assert off["greedy_agreement"] == pytest.approx(exact["greedy_agreement"], abs=0.02)
    predicted = result["predicted_mean_accepted_length"]
    assert predicted["per_token_measure"] == "greedy_agreement"
    alpha = exact["greedy_agreement"]
    assert predicted["exact_continuations"] == pytest.approx(sum(alpha ** i for i in range(4)))
    assert predicted["measured"] == result["speculative"]["mean_accepted_length"]
    assert "exact on target continuations" in format_table([result, result])
    # A cache of dataset answers is not a cache of continuations.
    with pytest.raises(UserError, match="not generated continuations"):
        evaluate(cfg, [str(draft_dir)], ("offline",), progress=False,
                 continuations_cache=cfg.cache.cache)


def test_iid_mean_accepted_length():
    from adaspec.speedup import iid_expected_tokens

    assert iid_expected_tokens(0.0, 5) == 1.0
    assert iid_expected_tokens(1.0, 5) == 6.0
    assert iid_expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_compare_gives_paired_differences_with_clustered_errors(setup, tmp_path):
    import torch

    from adaspec.cli.eval_format import format_comparison
    from adaspec.statistics import clustered_difference, compare

    cfg, draft_dir = setup
    second = tmp_path / "second"
    make_tiny_model(300, n_layers=1, seed=13).save_pretrained(second)
    models.load_tokenizer(str(draft_dir)).save_pretrained(second)
    results = evaluate(cfg, [str(draft_dir), str(second), str(draft_dir)], ("exact",),
                       progress=False, per_token=True)
    rows = compare(results)
    label = "exact acceptance on answers"
    assert rows[1][label] == (0.0, 0.0)  # a draft against itself
    a = results[0]["exact"]["per_token"]
    b = results[1]["exact"]["per_token"]
    mean, se = rows[0][label]
    assert mean == pytest.approx(results[0]["exact"]["expected_acceptance"]
                                 - results[1]["exact"]["expected_acceptance"])
    # against a direct computation of the clustered standard error
    diff = torch.tensor(a["expected_acceptance"]) - torch.tensor(b["expected_acceptance"])
    sums = torch.stack([p.sum() for p in diff.double().split(a["sequence_lengths"])])
    g, n = len(a["sequence_lengths"]), len(diff)
    want = (g / (g - 1) * ((sums - torch.tensor(a["sequence_lengths"]) * diff.double().mean())
                           ** 2).sum()).sqrt() / n
    assert se == pytest.approx(float(want))
    assert clustered_difference([[1.0, 2.0, 3.0, 4.0]], [[0.0] * 4], [2, 2])[0] == 2.5
    # two runs (seeds) of the same sequences: one cluster per sequence over both runs
    runs_a = [[1.0, 2.0, 3.0, 4.0, 0.5], [2.0, 0.0, 1.0, 3.0, 1.5]]
    runs_b = [[0.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 2.0, 0.0]]
    pooled = torch.tensor(runs_a, dtype=torch.float64) - torch.tensor(runs_b, dtype=torch.float64)
    cluster = torch.stack([pooled[:, :2].sum(), pooled[:, 2:4].sum(), pooled[:, 4:].sum()])
    sizes = torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64)
    want = (3 / 2 * ((cluster - sizes * pooled.mean()) ** 2).sum()).sqrt() / pooled.numel()
    got = clustered_difference(runs_a, runs_b, [2, 2, 1])
    assert got == pytest.approx((float(pooled.mean()), float(want)))
    assert "minus" in format_comparison(rows) and " pt" in format_comparison(rows)


def test_gamma_auto_picks_the_predicted_fastest_and_reports_predicted_speed(setup):
    """--gamma auto: a pilot at --max-gamma gives P(A >= i); with this machine's step costs
    the predicted fastest gamma is run, and its predicted speedup is reported beside the
    measured one. Greedy drafts do not depend on gamma, so the run's own P(A >= i) equals the
    pilot's on the positions both drafted."""
    from adaspec.cli.eval_format import format_result

    cfg, draft_dir = setup
    [result] = evaluate(cfg, [str(cfg.models.target)], ("speculative",), gamma="auto",
                        max_gamma=4, max_new_tokens=12, n_prompts=2, progress=False)
    s = result["speculative"]
    auto = s["gamma_auto"]
    assert set(auto["predicted_speedups"]) <= {1, 2, 3, 4} and auto["pilot_gamma"] == 4
    assert result["gamma"] == auto["gamma"] == max(
        auto["predicted_speedups"], key=lambda g: (auto["predicted_speedups"][g], -g))
    assert auto["pilot_at_least"][0] == 1.0  # the target as its own draft: every draft kept
    assert s["at_least"] == auto["pilot_at_least"][:result["gamma"]]
    c = s["costs"]
    assert c["target_step_s"] > 0 and c["draft_cost"] > 0 and set(c["verify_cost"]) == {1, 2, 3, 4}
    assert s["predicted_speedup"] == pytest.approx(
        auto["predicted_speedups"][result["gamma"]])
    assert sum(s["accepted_at"]) == s["accepted"] and sum(s["drafted_at"]) == s["drafted"]
    text = format_result(result)
    assert "gamma auto" in text and "predicted speedup" in text and "speedup" in text


@pytest.mark.parametrize("prepack", [True, False])
def test_speculative_decoding_says_whether_linears_were_prepacked(setup, prepack):
    """Decoding on a CPU in fp32 prepacks the linear layers (adaspec/cpu_decoding.py) after the
    teacher-forced measures, which stay those of the plain models; --no-prepack keeps them."""
    cfg, draft_dir = setup
    plain = evaluate(cfg, [str(draft_dir)], ("exact",), progress=False)[0]
    [result] = evaluate(cfg, [str(draft_dir)], ("exact", "speculative"), gamma=2,
                        max_new_tokens=6, n_prompts=1, speed=False, prepack=prepack,
                        progress=False)
    assert result["speculative"]["prepacked_linears"] is (
        prepack and torch.backends.mkldnn.is_available())
    assert result["exact"] == plain["exact"]


def test_gamma_auto_without_speculative_decoding_predicts_at_max_gamma(setup):
    """`--modes exact` with a config's `gamma: auto` (the demo's) died predicting the accepted
    length at gamma "auto" (a TypeError traceback); auto is chosen by speculative decoding, so
    without it the prediction is made at --max-gamma."""
    from adaspec.cli.eval_format import format_result
    from adaspec.speedup import iid_expected_tokens

    cfg, draft_dir = setup
    [result] = evaluate(cfg, [str(draft_dir)], ("exact",), gamma="auto", max_gamma=3,
                        max_new_tokens=6, n_prompts=1, progress=False)
    assert result["gamma"] == 3
    predicted = result["predicted_mean_accepted_length"]
    assert predicted["exact"] == pytest.approx(
        iid_expected_tokens(result["exact"]["greedy_agreement"], 3))
    assert "speculative" not in result and format_result(result)


@pytest.mark.parametrize("speed", [True, False])
def test_speculative_results_format_with_and_without_speed(setup, speed):
    """--no-speed used to die formatting the result (KeyError: 'speed_rounds') after the
    whole evaluation had run."""
    from adaspec.cli.eval_format import format_result

    cfg, draft_dir = setup
    results = evaluate(cfg, [str(draft_dir)], ("speculative",), gamma=2, max_new_tokens=4,
                       n_prompts=1, speed=speed, progress=False)
    text = format_result(results[0]) + format_table(results)
    assert ("tok/s" in text) is speed


MODE_SETS = ["offline", "exact", "offline,exact", "speculative", "offline,speculative",
             "exact,speculative", "offline,exact,speculative"]


@pytest.mark.parametrize("modes", MODE_SETS)
def test_every_mode_and_flag_combination_is_written_and_formatted(setup, tmp_path, modes,
                                                                  capsys):
    """Through the CLI: every set of modes, with and without speed timing, one draft and two
    compared (--compare), --gamma auto with speculative: exit 0, the JSON written, text printed.
    (--no-speed once died formatting after the whole evaluation, before --json was written.)"""
    import json

    from adaspec.cli import eval as eval_cli
    from adaspec.cli.common import run

    cfg, draft_dir = setup
    base = ["--cache", cfg.cache.cache, "--task", "gsm8k", "--split", "test", "--data-files",
            str(GSM8K), "--limit", "6", "--target", cfg.models.target, "--modes", modes,
            "--prompts", "1", "--max-new-tokens", "4", "--no-progress"]
    speculative = "speculative" in modes
    variants = [["--draft", str(draft_dir)],
                ["--draft", str(draft_dir), cfg.models.target, "--compare"]]
    if speculative:
        variants += [[*v, "--no-speed"] for v in variants]
        variants.append(["--draft", str(draft_dir), "--gamma", "auto", "--max-gamma", "2"])
    for i, extra in enumerate(variants):
        out = tmp_path / f"r{i}.json"
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run(eval_cli.main, [*base, *extra, "--json", str(out)])
        printed = capsys.readouterr()
        assert exit_info.value.code == 0, (extra, printed.err[-1500:])
        written = json.loads(out.read_text())
        results = written if isinstance(written, list) else [written]
        assert len(results) == (2 if "--compare" in extra else 1)
        assert f"draft {draft_dir}" in printed.out
        if "--compare" in extra and "exact" in modes:
            assert "minus" in printed.out
        if speculative:
            assert ("tok/s" in printed.out) is ("--no-speed" not in extra)
