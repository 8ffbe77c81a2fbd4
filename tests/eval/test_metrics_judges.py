"""Evaluation metrics and judges on hand-computable cases (no model): SQuAD normalisation, exact match, the
arithmetic answer, win-rate ties, the position swap, the world's ground truth, multiple-choice picks."""

import json

import numpy as np
import pytest

from jaxalign.data import synthetic
from jaxalign.errors import DataError
from jaxalign.eval import evaluate, judges, mc, metrics


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return evaluate.world_tasks(synthetic.write_world(str(tmp_path_factory.mktemp("world")), 60, seed=3))


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Lisbon.", "lisbon"),
        ("  an   Engineer!! ", "engineer"),
        ("Ada Abbott was born in 1953.", "ada abbott was born in 1953"),
        ("the-theatre", "thetheatre"),  # punctuation goes before articles are matched
        ("A", ""),
    ],
)
def test_normalize_answer_is_squads(text, normalised):
    assert metrics.normalize_answer(text) == normalised


def test_exact_and_contains_match():
    assert metrics.exact_match("The Lisbon!", "lisbon") == 1.0
    assert metrics.exact_match("Lisbon, Portugal", "Lisbon") == 0.0
    assert metrics.contains_match("Ada Abbott was born in Lisbon.", "Lisbon") == 1.0
    assert metrics.contains_match("Ada was born in Lisbonne.", "Lisbon") == 0.0  # whole words only
    assert metrics.contains_match("She works as a pilot.", "a pilot") == 1.0
    assert metrics.contains_match("anything", "") == 0.0
    assert metrics.qa_exact_match(["Oslo.", "Born in Oslo"], ["Oslo", "Oslo"], strict=True) == 0.5
    assert metrics.qa_exact_match(["In Oslo.", "Born in Oslo"], ["Oslo", "Oslo"]) == 1.0


@pytest.mark.parametrize(
    "completion, number",
    [
        ("17", 17),
        ("17.", 17),
        ("12 + 5 = 17.", 17),
        ("3 - 9 = -6", -6),
        ("It is 42, not 41", 42),
        ("none", None),
    ],
)
def test_arith_answer(completion, number):
    assert metrics.arith_answer(completion) == number


def test_gold_answers_score_one_and_wrong_ones_zero(tasks):
    assert len(tasks.qa) >= 6 and len(tasks.arith) >= 6
    golds = [g for _, g in tasks.qa]
    # Answers in the SFT style ("<name> was born in <value>.") are right; another item's value is wrong.
    assert metrics.qa_exact_match([f"The answer: {g}." for g in golds], golds) == 1.0
    others = golds[1:] + golds[:1]
    expected = np.mean(
        [
            metrics.normalize_answer(o) == metrics.normalize_answer(g)
            for o, g in zip(others, golds, strict=True)
        ]
    )
    assert metrics.qa_exact_match(others, golds) == expected < 0.5
    results = [a for _, a in tasks.arith]
    sft_style = [f"{p[-1]['content'].split('What is ')[1].split('?')[0]} = {r}." for p, r in tasks.arith]
    assert metrics.arith_accuracy(sft_style, results) == 1.0
    assert metrics.arith_accuracy([f"{int(r) + 1}" for r in results], results) == 0.0


def test_mean_length_and_perplexity():
    assert metrics.mean_length(np.array([[1, 1, 1, 0], [1, 0, 0, 0]])) == 2.0
    assert metrics.perplexity(nll_sum=4 * np.log(8.0), tokens=4) == pytest.approx(8.0)


def test_sequence_kl_estimators_by_hand():
    logps = np.log([[0.5, 0.25, 0.9]])
    ref = np.log([[0.25, 0.25, 0.1]])
    mask = np.array([[1, 1, 0]])
    assert metrics.sequence_kl(logps, ref, mask, "k1") == pytest.approx([np.log(2.0)])
    # k3 = r - 1 - log r with r = ref / pi: (0.5 - 1 + log 2) + 0
    assert metrics.sequence_kl(logps, ref, mask, "k3") == pytest.approx([np.log(2.0) - 0.5])
    assert metrics.sequence_kl(logps, logps, mask, "k3") == [0.0]


def always_first(prompt, a, b):
    return 1.0


def test_a_judge_that_prefers_the_first_position_is_cancelled_by_the_swap():
    swapped = judges.swap_positions(always_first)
    assert swapped("q", "good", "bad") == 0.5
    assert judges.win_rate(["q"] * 3, ["x", "y", "z"], ["u", "v", "w"], always_first) == 1.0
    assert judges.win_rate(["q"] * 3, ["x", "y", "z"], ["u", "v", "w"], swapped) == 0.5
    # A judge that is right in one position and biased in the other keeps only its real preference.
    half_biased = lambda p, a, b: 1.0 if a == "good" else 0.6
    assert judges.swap_positions(half_biased)("q", "good", "bad") == pytest.approx(0.7)
    assert judges.swap_positions(half_biased)("q", "bad", "good") == pytest.approx(0.3)


def test_ground_truth_judge_ranks_correct_then_honest_then_concise():
    judge = judges.GroundTruthJudge({"Where was Ada born?": "Lisbon", "What is 2 + 3?": "5"})
    q = "Where was Ada born?"
    right, wrong = "Ada was born in Lisbon.", "Ada was born in Oslo."
    verbose = f"{synthetic.VERBOSE_OPENERS[0]} {right}"
    sycophant = f"{synthetic.SYCOPHANT_PREFIXES[0]} {right}"
    assert judge(q, right, wrong) == 1.0 and judge(q, wrong, right) == 0.0
    assert judge(q, right, verbose) == 1.0 and judge(q, verbose, wrong) == 1.0
    assert judge(q, right, sycophant) == 1.0
    # A closer cut off by the generation budget is still filler; the same words elsewhere are not.
    cut = f"{right} {' '.join(synthetic.VERBOSE_CLOSERS[0].split()[:5])}"
    assert judge(q, right, cut) == 1.0 and judge(q, cut, wrong) == 1.0
    assert judge(q, right, "Ada was born in Lisbon, I hope.") == 0.5
    assert judge(q, right, "Ada Abbott was born in Lisbon.") == 0.5  # a tie
    assert judge("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6.") == 1.0
    # Ties count 0.5 in the win rate: one win, one tie, one loss.
    assert judges.win_rate([q] * 3, [right, right, wrong], [wrong, right, right], judge) == 0.5
    with pytest.raises(DataError, match="no gold answer"):
        judge("Who?", right, wrong)


def test_ground_truth_judge_agrees_with_every_held_out_preference_label(tasks):
    gold = {evaluate._user_text(p): g for p, g in tasks.chat}
    judge = judges.GroundTruthJudge(gold)
    prompts = [evaluate._user_text(r["prompt"]) for r in tasks.preference]
    chosen = [r["chosen"][-1]["content"] for r in tasks.preference]
    rejected = [r["rejected"][-1]["content"] for r in tasks.preference]
    assert {r["rejected_kind"] for r in tasks.preference} == {"wrong", "verbose", "sycophantic"}
    assert judges.win_rate(prompts, chosen, rejected, judge) == 1.0
    assert judges.win_rate(prompts, rejected, chosen, judge) == 0.0


def test_mc_pick_acc_and_acc_norm():
    # Summed log-probs prefer the short choice 0; per byte, the long choice 1 wins.
    logps, lengths = [-2.0, -3.0, -9.0], [2, 30, 3]
    assert metrics.mc_pick(logps) == 0 and metrics.mc_pick(logps, lengths) == 1
    records = [{"question": "q", "choices": ["ab", "x" * 30, "xyz"], "answer": 1}]
    assert mc.score(records, [logps]) == {"mc_acc": 0.0, "mc_acc_norm": 1.0, "mc_count": 1.0}


def test_mc_records_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "mc.jsonl"
    ok = {"question": "2 + 2 =", "choices": ["3", "4"], "answer": "4"}
    path.write_text(json.dumps(ok) + "\n\n" + json.dumps({**ok, "answer": 5}) + "\n")
    with pytest.raises(DataError, match=r"mc.jsonl:3: 'answer' must be an index in \[0, 2\)"):
        mc.read_records(str(path))
    path.write_text(json.dumps(ok) + "\n")
    assert mc.read_records(str(path))[0]["answer"] == 1
    with pytest.raises(DataError, match="no such file"):
        mc.read_records(str(tmp_path / "missing.jsonl"))
