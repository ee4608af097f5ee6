"""studies/converged_study.py: a killed study continues, reusing every finished run."""

from __future__ import annotations

import json
import shutil

import pytest

from studies import converged_study, decision_rule

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tiny: str, work, seeds: str = "0") -> list[str]:
    return ["--train-rows", "8", "--val-rows", "4", "--test-rows", "4", "--prompts", "2",
            "--epochs", "1", "--batch-size", "2", "--k", "0.5", "--eval-every", "2",
            "--sft-epochs", "0.5", "--draft-vocab", "64",
            "--seeds", seeds, "--dense-seed", "-1", "--max-new-tokens", "6",
            "--quality-prompts", "1", "--target", tiny, "--draft", f"{tiny}@layers=1",
            "--raw-prompts", "--work", str(work), "--doc", str(work / "s.md"),
            "--out", str(work / "s.json")]


def test_killed_study_resumes_and_reuses_finished_runs(tiny_model_dir, tmp_path):
    work = tmp_path / "study"
    assert converged_study.main(_args(str(tiny_model_dir), work)) == 0
    seed = work / "seed-0"
    first = json.loads((work / "s.json").read_text())
    schedules = {arm: r["schedule"] for arm, r in first["seeds"][0]["runs"].items()}
    # R and A: the same optimizer steps (official schedule); C: A's batch and epochs
    assert schedules["R"]["optimizer_steps"] == schedules["A"]["optimizer_steps"] == 4
    assert (schedules["C"]["batch_size"], schedules["C"]["epochs"]) == \
        (schedules["A"]["batch_size"], schedules["A"]["epochs"]) == (4, 2.0)
    assert first["summary"]["decision"]["seeds"] == 1
    assert (work / "s.png").is_file() and "## Decision" in (work / "s.md").read_text()

    kept = {p: p.stat().st_mtime_ns for p in (
        work / "target" / "model" / "model.safetensors", seed / "R" / "model" / "model.safetensors",
        seed / "A" / "model" / "model.safetensors")}
    # Kill: C lost its model (as if killed after a checkpoint), the seed its evaluation, and a
    # second seed's R was killed before its first checkpoint (config.yaml only); the results
    # JSON was lost.
    shutil.rmtree(seed / "C" / "model")
    (work / "s.json").unlink()
    # between sessions: --report-only shows the unfinished seed's arms as they stand
    assert converged_study.main([*_args(str(tiny_model_dir), work), "--report-only"]) == 0
    standing = json.loads((work / "s.json").read_text())["in_progress"]["0"]
    assert set(standing) == {"R", "A", "C"} and standing["R"]["steps_done"] == 4
    assert standing["R"]["validation"] and "reached" in standing["R"]["plateau"]
    r1 = work / "seed-1" / "R"
    r1.mkdir(parents=True)
    shutil.copy(seed / "R" / "config.yaml", r1 / "config.yaml")
    assert converged_study.main(_args(str(tiny_model_dir), work, "0,1")) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished runs reused
    assert (seed / "C" / "model" / "config.json").is_file()
    again = json.loads((work / "s.json").read_text())
    assert [s["seed"] for s in again["seeds"]] == [0, 1]
    assert again["summary"]["decision"]["seeds"] == 2
    assert len(again["summary"]["comparisons"]["A - C"]["greedy_agreement"]["per_seed"]) == 2
    c = again["summary"]["per_arm"]["C"]
    mean_row = next(line for line in (work / "s.md").read_text().splitlines()
                    if line.startswith("| C: ") and "| mean |" in line)
    assert f"| {(c[0]['greedy_agreement'] + c[1]['greedy_agreement']) / 2:.4f} |" in mean_row


def test_a_longer_study_extends_finished_runs(tiny_model_dir, tmp_path):
    """--epochs raised after runs had not plateaued: R and C continue where they ended (the same
    training, constant rate), the reference losses are rebuilt from the longer R, and A starts
    over against it (its first steps selected against the shorter R)."""
    from adaspec import models, runs

    work = tmp_path / "study"
    assert converged_study.main(_args(str(tiny_model_dir), work)) == 0
    seed = work / "seed-0"
    longer = _args(str(tiny_model_dir), work)
    longer[longer.index("--epochs") + 1] = "2"
    with pytest.raises(SystemExit, match=r"other settings \(epochs\)"):  # not its results
        converged_study.main(longer)
    longer[longer.index("--out") + 1] = str(work / "longer.json")
    assert converged_study.main(longer) == 0
    steps = {arm: [m["step"] for m in runs.training_metrics(seed / arm)] for arm in "RAC"}
    assert steps["R"] == list(range(1, 9)) and steps["C"] == list(range(1, 9))
    assert steps["A"] == list(range(1, 9))
    r_hash = models.model_identity(str(runs.model_dir(seed / "R")))["weight_hash"]
    assert runs.read_config(seed / "A")["reference"]["weight_hash"] == r_hash
    result = json.loads((work / "longer.json").read_text())
    assert result["seeds"][0]["runs"]["R"]["schedule"]["epochs"] == 2.0


def test_the_dense_pair_runs_after_every_seeds_main_arms(tiny_model_dir, tmp_path):
    """The verdict (R, A, C of every seed) comes first; the --online pair of one seed last."""
    work = tmp_path / "study"
    args = _args(str(tiny_model_dir), work, "0,1")
    args[args.index("--dense-seed") + 1] = "0"
    assert converged_study.main(args) == 0
    started = {(seed, arm): (work / f"seed-{seed}" / arm / "config.yaml").stat().st_mtime_ns
               for seed in (0, 1) for arm in ("R", "A", "C")}
    dense = (work / "seed-0" / "A-dense" / "config.yaml").stat().st_mtime_ns
    assert dense > max(started.values())
    result = json.loads((work / "s.json").read_text())
    assert result["seeds"][0]["arms"] == ["R", "A", "C", "A-dense", "C-dense"]
    assert "A-dense - C-dense" in result["summary"]["comparisons"]


def test_a_study_continues_from_its_results_when_the_work_folder_is_gone(tiny_model_dir,
                                                                         tmp_path):
    """A new machine: the work folder is gone, the results JSON (committed) is not. Its finished
    seeds are reused, not trained again; the dense pair of a restored seed trains R (its
    reference) and the pair only; other settings reuse nothing; another tuned target refuses."""
    work, out = tmp_path / "study", tmp_path / "results.json"

    def args(seeds: str, dense: int = -1) -> list[str]:
        a = _args(str(tiny_model_dir), work, seeds)
        a[a.index("--out") + 1] = str(out)
        a[a.index("--dense-seed") + 1] = str(dense)
        return a

    assert converged_study.main(args("0")) == 0
    first = json.loads(out.read_text())
    assert first["tuned_target"]
    shutil.rmtree(work)
    assert converged_study.main(args("0,1", dense=0)) == 0
    assert not (work / "seed-0" / "A").exists() and not (work / "seed-0" / "C").exists()
    assert (work / "seed-0" / "R").is_dir() and (work / "seed-1" / "A").is_dir()
    result = json.loads(out.read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    seed0 = result["seeds"][0]
    assert seed0["arms"] == ["R", "A", "C", "A-dense", "C-dense"]
    assert len(seed0["drafts"]) == len(seed0["teacher_forced"]) == len(seed0["decoding"]) == 6
    assert seed0["differences"]["A - C"] == first["seeds"][0]["differences"]["A - C"]
    ac = result["summary"]["comparisons"]["A - C"]["greedy_agreement"]["per_seed"]
    assert ac[0] == first["seeds"][0]["differences"]["A - C"]["greedy_agreement"][0]
    assert len(ac) == 2 and "A-dense - C-dense" in result["summary"]["comparisons"]
    # --report-only from the results alone (work folder gone again) keeps every seed, and
    # the machine that ran the study (not the one making the report)
    shutil.rmtree(work)
    out.write_text(json.dumps({**result, "machine": {**result["machine"], "cpu": "the study's"}}))
    assert converged_study.main([*args("0,1", dense=0), "--report-only"]) == 0
    reported = json.loads(out.read_text())
    assert reported["summary"] == result["summary"] and reported["machine"]["cpu"] == "the study's"

    kept = out.read_bytes()
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        converged_study.main([*args("0"), "--lr", "1e-3", "--report-only"])
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        converged_study.main([*args("0"), "--lr", "1e-3"])
    assert out.read_bytes() == kept
    # a run of one seed keeps the others' records
    assert converged_study.main([*args("1"), "--report-only"]) == 0
    assert [s["seed"] for s in json.loads(out.read_text())["seeds"]] == [0, 1]

    out.write_text(json.dumps({**result, "tuned_target": "0" * 64}))
    with pytest.raises(SystemExit, match="another tuned target"):
        converged_study.main(args("0"))


def test_the_verdict_sentence_states_the_rule_outcome_and_the_interval():
    from adaspec.statistics import t_interval

    per_seed = [-0.016, -0.010, -0.022]
    comparisons = {"A - C": {"greedy_agreement": {"per_seed": per_seed, **t_interval(per_seed)}}}
    summary = {"comparisons": comparisons,
               "decision": converged_study.decision(comparisons, {"C": [False] * 3})}
    text = decision_rule.verdict_sentence(summary, "greedy_agreement")
    interval = comparisons["A - C"]["greedy_agreement"]
    assert summary["decision"]["outcome"] == "C beats A" and "**C beats A** after 3" in text
    assert f"[{interval['low'] * 100:+.2f}, {interval['high'] * 100:+.2f}]" in text
    assert "(incomplete)" not in text and "-1.60, -1.00, -2.20" in text and text.endswith("no.")


def test_the_cache_check_sentence_sets_the_dense_pair_beside_the_cached_one():
    arms = ["R", "A", "C", "A-dense", "C-dense"]
    agreement = [0.02, 0.90, 0.91, 0.93, 0.905, 0.94]  # untrained, then the arms

    def draft(g):
        return {"exact_continuations": {"greedy_agreement": g, "expected_acceptance": g},
                "exact": {"expected_acceptance": g}}

    seed = {"seed": 0, "arms": arms, "teacher_forced": [draft(g) for g in agreement],
            "decoding": [{"speculative": {"mean_accepted_length": 4.0}}] * 6,
            "differences": {"A - C": {"greedy_agreement": [-0.02, 0.003]}}}
    payload = {"seeds": [seed]}
    assert converged_study.cache_check_sentence(payload) is None  # no dense pair yet
    seed["differences"]["A-dense - C-dense"] = {"greedy_agreement": [-0.035, 0.004]}
    text = converged_study.cache_check_sentence(payload)
    assert "A-dense - C-dense -3.50 ± 0.40 pt" in text and "-2.00 ± 0.30 pt" in text
    assert "same sign: yes" in text and "A -0.50 pt, C +1.00 pt" in text
    seed["differences"]["A-dense - C-dense"] = {"greedy_agreement": [0.01, 0.004]}
    assert "same sign: no" in converged_study.cache_check_sentence(payload)


@pytest.mark.parametrize("per_seed, c_flat, outcome", [
    ([0.02, 0.018, 0.022], [True] * 3, "A beats C"),
    ([0.02, 0.018, 0.022], [True, False, True], "no difference shown"),  # C still rising
    ([0.02, -0.001, 0.03], [True] * 3, "no difference shown"),  # one seed the other way
    ([0.02], [True], "no difference shown"),  # one seed: no interval
    ([-0.016, -0.011, -0.016], [False] * 3, "C beats A"),  # C rising only widens the gap
    ([-0.03, 0.001, -0.02], [True] * 3, "no difference shown"),
])
def test_the_decision_rule(per_seed, c_flat, outcome):
    from adaspec.statistics import t_interval

    ac = {"per_seed": per_seed, **t_interval(per_seed)}
    d = converged_study.decision({"A - C": {"greedy_agreement": ac}}, {"C": c_flat})
    assert d["outcome"] == outcome and d["seeds"] == len(per_seed)
    assert d["interval_above_zero"] == (len(per_seed) >= 2 and ac["low"] > 0)
    assert d["interval_below_zero"] == (len(per_seed) >= 2 and ac["high"] < 0)
    assert d["control_plateaued"] == all(c_flat) and d["complete"] == (len(per_seed) >= 3)
    assert decision_rule.parts_sentence(d).startswith(
        f"The rule's parts: A-C positive in every seed: {all(v > 0 for v in per_seed)}, ")


@pytest.mark.parametrize("sd, half_width, seeds", [
    (0.0027, 0.01, 3),  # the converged study's A - C spread: 3 seeds resolve 1 pt
    (0.0111, 0.01, 8),  # its A - R spread
    (0.02, 0.01, 18),
    (0.0, 0.01, 2),
])
def test_the_seeds_a_difference_needs(sd, half_width, seeds):
    """The fewest n with t(0.975, n - 1) sd / sqrt(n) <= half_width, against a dense check."""
    import math

    from adaspec.statistics import t_quantile

    n = decision_rule.seeds_needed(sd, half_width)
    assert n == seeds
    if sd > 0:
        assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= half_width
        assert t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) > half_width or n == 2


def test_the_power_sentence_reads_the_spread_of_the_seeds():
    from adaspec.statistics import t_interval

    values = [0.0096, 0.0037, -0.0118]
    text = decision_rule.power_sentence({"per_seed": values, **t_interval(values)}, "A - R")
    assert f"{t_interval(values)['sd'] * 100:.2f} pt over 3 seeds" in text
    assert text.endswith(f"needs {decision_rule.seeds_needed(t_interval(values)['sd'], 0.01)} "
                         "seeds.")
    assert decision_rule.power_sentence({"per_seed": [0.01], **t_interval([0.01])}) is None


def test_a_session_that_ends_mid_seed_keeps_its_finished_arms(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    """Each arm is in the results (and its per-token values beside them) once evaluated: a new
    machine continues with the next arm; R is trained again only for an A arm, and must be the
    same R (weight hash); a pair whose arms ran in two sessions gets its difference."""
    from pathlib import Path

    work, out = tmp_path / "study", tmp_path / "results.json"
    args = _args(str(tiny_model_dir), work)
    args[args.index("--out") + 1] = str(out)
    args[args.index("--dense-seed") + 1] = "0"
    real = converged_study.ensure_run

    def killed_at(arm: str):
        def ensure_run(cfg, progress, reference=None):
            if Path(cfg.train.out).name == arm:
                raise KeyboardInterrupt  # the session ends while this arm trains
            return real(cfg, progress, reference)
        return ensure_run

    monkeypatch.setattr(converged_study, "ensure_run", killed_at("C"))
    with pytest.raises(KeyboardInterrupt):
        converged_study.main(args)
    first = json.loads(out.read_text())
    [seed] = first["seeds"]
    assert seed["arms"] == ["R", "A"] and set(seed["differences"]) == {"A - R"}
    assert first["summary"]["decision"]["seeds"] == 0 and "A" in first["summary"]["per_arm"]
    assert (tmp_path / "results" / "seed-0.tokens.json.gz").is_file()

    shutil.rmtree(work)  # a new machine, first without the per-token values: C's
    tokens = tmp_path / "results" / "seed-0.tokens.json.gz"  # differences could not be made
    kept = tokens.read_bytes()
    tokens.unlink()
    with pytest.raises(SystemExit, match="per-token values are not in"):
        converged_study.main(args)
    assert not (work / "seed-0" / "C").exists()
    tokens.write_bytes(kept)
    monkeypatch.setattr(converged_study, "ensure_run", killed_at("C-dense"))
    with pytest.raises(KeyboardInterrupt):
        converged_study.main(args)
    second = json.loads(out.read_text())
    [seed] = second["seeds"]
    assert seed["arms"] == ["R", "A", "C", "A-dense"]
    assert seed["teacher_forced"][:3] == first["seeds"][0]["teacher_forced"]  # not redone
    assert not (work / "seed-0" / "A").exists() and (work / "seed-0" / "R").is_dir()
    assert second["summary"]["decision"]["seeds"] == 1
    assert set(seed["differences"]) == {"A - R", "A - C", "C - R"}

    shutil.rmtree(work)
    monkeypatch.setattr(converged_study, "ensure_run", real)
    assert converged_study.main(args) == 0
    [seed] = json.loads(out.read_text())["seeds"]
    assert seed["arms"] == ["R", "A", "C", "A-dense", "C-dense"]
    assert "A-dense - C-dense" in seed["differences"]  # A-dense's tokens from the last session
    assert not (work / "seed-0" / "R").exists()  # C-dense selects against nothing

    tokens.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="not readable per-token values"):
        converged_study.read_tokens(tokens)


def test_seeds_run_in_parallel_merge_into_one_results_file(tiny_model_dir, tmp_path):
    """Each seed with its own --out (the same --work), then --merge: the merged file holds
    every seed with its per-token values and the summary over all of them, computed from the
    parts alone; a seed twice with other values, a part without its per-token values, another
    protocol or another tuned target is refused and nothing is written."""
    work, parts = tmp_path / "study", tmp_path / "parts"

    def args(seeds: str, out) -> list[str]:
        a = _args(str(tiny_model_dir), work, seeds)
        a[a.index("--out") + 1] = str(out)
        a[a.index("--doc") + 1] = str(out.with_suffix(".md"))
        return a

    for seed in (0, 1):
        assert converged_study.main(args(str(seed), parts / f"seed-{seed}.json")) == 0
    shutil.rmtree(work)  # the merge computes nothing: the parts are all it reads
    merged = tmp_path / "merged.json"
    part_files = [str(parts / "seed-0.json"), str(parts / "seed-1.json")]
    assert converged_study.main([*args("0,1", merged), "--merge", *part_files]) == 0
    result = json.loads(merged.read_text())
    one = [json.loads((parts / f"seed-{s}.json").read_text()) for s in (0, 1)]
    assert result["seeds"] == [one[0]["seeds"][0], one[1]["seeds"][0]]
    ac = result["summary"]["comparisons"]["A - C"]["greedy_agreement"]
    assert ac["per_seed"] == [p["summary"]["comparisons"]["A - C"]["greedy_agreement"]
                              ["per_seed"][0] for p in one]
    assert ac["n"] == 2 and result["summary"]["decision"]["seeds"] == 2
    assert result["tuned_target"] == one[0]["tuned_target"]
    for seed in (0, 1):
        assert (tmp_path / "merged" / f"seed-{seed}.tokens.json.gz").read_bytes() == \
            (parts / f"seed-{seed}" / f"seed-{seed}.tokens.json.gz").read_bytes()
    # merging again (the same seeds, the same values) changes nothing; nor does a merge of
    # one part into an --out that holds both seeds already
    before = merged.read_bytes()
    assert converged_study.main([*args("0,1", merged), "--merge", *part_files]) == 0
    assert converged_study.main([*args("0,1", merged), "--merge", part_files[1]]) == 0
    again = json.loads(merged.read_bytes())
    assert again["seeds"] == json.loads(before)["seeds"]
    assert again["summary"] == json.loads(before)["summary"]

    other = tmp_path / "other.json"
    changed = json.loads((parts / "seed-1.json").read_text())
    changed["seeds"][0]["differences"]["A - C"]["greedy_agreement"][0] += 0.5
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "seed-1.json"
    bad.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="seed 1 is also in .*seed-1.json, with other values"):
        converged_study.main([*args("0,1", other), "--merge", *part_files, str(bad)])
    with pytest.raises(SystemExit, match=f"seed 1 is also in {merged}, with other values"):
        converged_study.main([*args("0,1", merged), "--merge", str(bad)])
    assert json.loads(merged.read_bytes())["seeds"] == again["seeds"]  # refused: untouched
    unfinished = json.loads((parts / "seed-1.json").read_text())
    unfinished["seeds"][0]["arms"] = ["R", "A"]
    bad.write_text(json.dumps(unfinished))
    with pytest.raises(SystemExit, match=r"seed 1 is not finished \(arms R, A\)"):
        converged_study.main([*args("0,1", other), "--merge", str(bad)])
    bad.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="no per-token values for every arm of seed 1"):
        converged_study.main([*args("0,1", other), "--merge", str(bad)])
    bad.write_text(json.dumps({**one[1], "tuned_target": "0" * 64}))
    with pytest.raises(SystemExit, match="another tuned target"):
        converged_study.main([*args("0,1", other), "--merge", part_files[0], str(bad)])
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        converged_study.main([*args("0,1", other), "--lr", "1e-3", "--merge", *part_files])
    assert not other.exists() and not (tmp_path / "other").exists()


def test_the_targets_quality_is_measured_again_under_other_settings(tmp_path, monkeypatch):
    """Kept beside the work, named by what it measured: another --max-new-tokens (or number of
    prompts) measures again rather than reading the other settings' figures."""
    import argparse

    from adaspec import models, quality

    class Model:  # what target_quality asks of a model here: eval()
        def eval(self):
            return self

    calls = []
    monkeypatch.setattr(models, "load_model", lambda spec: (Model(), None))
    monkeypatch.setattr(quality, "target_quality", lambda cfg, model, tok, prompts, new, progress:
                        calls.append((prompts, new)) or {"quality": 0.5, "new": new})
    args = argparse.Namespace(quality_prompts=2, max_new_tokens=6, test_rows=4, target="t",
                              draft="d", task="arith", max_length=64, raw_prompts=True,
                              train_rows=8, lr=1e-3, batch_size=2, eval_every=2, gamma=2,
                              prompts=2, progress=False)
    first = converged_study.target_quality(args, tmp_path, "tuned")
    assert converged_study.target_quality(args, tmp_path, "tuned") == first
    assert calls == [(2, 6), (2, 6)]  # before and after fine-tuning, once
    args.max_new_tokens = 12
    longer = converged_study.target_quality(args, tmp_path, "tuned")
    assert calls[2:] == [(2, 12), (2, 12)] and longer["after fine-tuning"]["new"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality-2x12.json", "quality-2x6.json"]
