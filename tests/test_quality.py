"""Task quality of a target's outputs: final answers and overlap, on real rows."""

from __future__ import annotations

import pytest

from adaspec import tasks
from adaspec.quality import final_answer, overlap_f1, score


def test_final_answers():
    assert final_answer("so 3 + 4 = 7.\nThe final answer is:  1,234") == "1234"
    assert final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert final_answer("The answer is 18 dollars, or 18.0") == "18"
    assert final_answer("It costs -5 then 12.5") == "12.5"
    assert final_answer("no numbers here") is None
    assert final_answer("3 apples.\nThe final answer is: none") is None


def test_scores_on_real_rows(shared_data):
    rows = tasks.load_examples("gsm8k", "test", str(shared_data / "gsm8k" / "train.jsonl"), 5, 0)
    for ex in rows:  # the reference scores 1 against itself, a wrong number 0
        assert score("gsm8k", ex.response, ex.response) == 1.0
        wrong = ex.response.rsplit(":", 1)[0] + ": 999999"
        assert score("gsm8k", wrong, ex.response) == 0.0
    assert overlap_f1("the cat sat", "The cat sat.") == 1.0
    assert overlap_f1("a b", "c d") == 0.0
    assert overlap_f1("the cat", "the cat sat on") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert score("xsum", "", "anything") == 0.0
