"""Every study's `--report-only` makes its committed doc again, byte for byte, from its committed
results (nothing computed, nothing in the repository written: results and doc go to tmp_path)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "studies" / "results"
DOCS = REPO / "docs"


def _protocol_flags(study, settings: dict) -> list[str]:
    """The command-line flags that give `settings` (a converged-study results file's)."""
    flags = []
    for key, value in settings.items():
        if key in study.NOT_PROTOCOL or value is False or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def _copy_results(name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.json"
    shutil.copy(RESULTS / f"{name}.json", out)
    return out


@pytest.mark.parametrize("module, name", [
    ("paper_table", "paper_table"), ("ablation", "ablation"),
    ("converged_study", "converged_study"), ("served_speedup", "served_speedup"),
    ("converged_study", "weak_draft_study"),  # the same protocol in the weak-draft regime
    ("converged_study", "weak_draft_h128_study"),  # the weak-draft regime, its first size
    ("converged_study", "weak_draft_short_study"),  # and a shorter budget, fixed beforehand
    ("converged_study", "gsm8k_study"),  # real data, the 2-layer draft
])
def test_report_only_remakes_the_committed_doc(module, name, tmp_path):
    import importlib

    study = importlib.import_module(f"studies.{module}")
    out, doc = _copy_results(name, tmp_path), tmp_path / "docs" / f"{name}.md"
    args = ["--report-only", "--out", str(out), "--doc", str(doc)]
    if module in ("paper_table", "converged_study"):
        args += ["--work", str(tmp_path / "work")]  # no work folder: from the results alone
    if module == "converged_study":  # its protocol flags must be the results' own
        args += _protocol_flags(study, json.loads(out.read_text())["settings"])
    assert study.main(args) == 0
    assert doc.read_text() == (DOCS / f"{name}.md").read_text()


def test_fidelity_report_only_remakes_its_committed_table(tmp_path):
    from studies import fidelity

    out, plots = _copy_results("fidelity", tmp_path), tmp_path / "plots"
    assert fidelity.main(["--report-only", "--out", str(out), "--plots", str(plots),
                          "--work", str(tmp_path / "work")]) == 0
    assert (plots / "table.md").read_text() == (DOCS / "fidelity" / "table.md").read_text()


def test_when_adaspec_remakes_its_committed_page(tmp_path):
    from studies import when_adaspec

    doc = tmp_path / "when_adaspec.md"
    assert when_adaspec.main(["--doc", str(doc), "--out", str(tmp_path / "w.json")]) == 0
    assert doc.read_text() == (DOCS / "when_adaspec.md").read_text()


def test_the_readme_quotes_the_rule_of_thumb_when_adaspec_writes():
    from studies import when_adaspec

    readme = " ".join((REPO / "README.md").read_text().split())
    assert f'"{when_adaspec.THUMB}"' in readme


@pytest.mark.parametrize("file, comparisons", [
    ("converged_study.json", ("A - C", "A - R")), ("weak_draft_study.json", ("A - C", "A - R")),
    ("weak_draft_short_study.json", ("A - C",)), ("gsm8k_study.json", ("A - C", "A - R", "C - R")),
])
def test_the_rule_of_thumb_quotes_the_committed_intervals(file, comparisons):
    """The rule of thumb is prose written by hand: every interval it quotes must be the one the
    committed results give (a study rerun or a typo shows here)."""
    from studies import when_adaspec

    summary = json.loads((RESULTS / file).read_text())["summary"]["comparisons"]
    for name in comparisons:
        v = summary[name][when_adaspec.HEADLINE]
        # "+0.41 pt [-1.66, +2.49]", "+0.05 [...]", or "lost ... by 1.46 pt [...]"
        quoted = (rf"{abs(v['mean']) * 100:.2f}( pt)? "
                  + re.escape(f"[{v['low'] * 100:+.2f}, {v['high'] * 100:+.2f}]"))
        assert re.search(quoted, when_adaspec.THUMB), (file, name, quoted)


def test_the_validation_gap_is_a_minus_c_at_three_quarters_of_cs_steps():
    from studies.when_adaspec import validation_gap

    def run(steps: int, values: dict) -> dict:
        return {"schedule": {"optimizer_steps": steps},
                "validation": [{"step": s, "greedy_agreement": v} for s, v in values.items()]}

    seeds = [{"runs": {"A": run(100, {50: 0.5, 70: 0.6, 80: 0.9}),
                       "C": run(100, {50: 0.4, 75: 0.55, 100: 0.7})}},
             {"runs": {"R": run(100, {75: 0.1})}}]  # no A and C: not counted
    gap = validation_gap(seeds)
    assert gap["step"] == 75 and gap["per_seed"] == pytest.approx([0.6 - 0.55])
    assert validation_gap(seeds[1:]) is None
