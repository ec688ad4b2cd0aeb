"""The offline answer metrics: normalisation, each metric's matches and misses, the lookup."""

import pytest

from vpt_plugin.evaluation.metrics import (
    METRICS,
    anls,
    default_metric,
    exact_match,
    levenshtein,
    normalize_answer,
    relaxed_match,
    score,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("  The Red Car. ", "red car"),
        ("Two dogs", "2 dogs"),
        ("an apple", "apple"),
        ("dont know", "don't know"),
        ("black/white", "black white"),
        ("yes, it is", "yes it is"),
        ("1,000", "1000"),
        ("3.5 meters.", "3.5 meters"),
        ("(left)?", "left"),
        ("line one\nline\ttwo", "line 1 line 2"),
        ("its", "its"),
    ],
)
def test_normalize_answer_follows_the_vqa_eval(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_compares_normalised_strings():
    assert exact_match("The cat.", ["cat"]) == 1.0
    assert exact_match("two", ["dog", "2"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_vqa_accuracy_counts_agreeing_annotators_up_to_three():
    references = ["red"] * 2 + ["dark red"] * 3 + ["maroon"] * 5
    assert len(references) == 10
    assert vqa_accuracy("Red", references) == pytest.approx(2 / 3)
    assert vqa_accuracy("dark red", references) == 1.0
    assert vqa_accuracy("maroon", references) == 1.0
    assert vqa_accuracy("blue", references) == 0.0


def test_vqa_accuracy_with_one_reference_is_exact_match():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0


def test_levenshtein_distance():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_anls_is_case_and_whitespace_insensitive():
    assert anls("  INVOICE  No ", ["invoice no"]) == 1.0


def test_anls_scores_near_misses_and_zeroes_past_the_threshold():
    # "kitten" -> "sitting": distance 3 over 7 characters, under the 0.5 threshold.
    assert anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    # "abcd" -> "abxy": distance 2 over 4 is exactly the threshold, so it counts as wrong.
    assert anls("abcd", ["abxy"]) == 0.0
    assert anls("abcd", ["abxy"], threshold=0.6) == pytest.approx(0.5)
    assert anls("abcd", ["wxyz"]) == 0.0


def test_anls_takes_the_best_reference():
    assert anls("2021-03-04", ["March 4, 2021", "2021-03-05"]) == pytest.approx(0.9)


def test_relaxed_match_exact_after_normalisation():
    assert relaxed_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert relaxed_match("Louvre", ["eiffel tower"]) == 0.0


def test_relaxed_match_numeric_tolerance_is_five_percent():
    assert relaxed_match("104", ["100"]) == 1.0
    assert relaxed_match("96", ["100"]) == 1.0
    assert relaxed_match("106", ["100"]) == 0.0
    assert relaxed_match("1,040", ["1000"]) == 1.0
    assert relaxed_match("45%", ["0.44"]) == 1.0
    assert relaxed_match("0", ["0"]) == 1.0
    assert relaxed_match("0.01", ["0"]) == 0.0


def test_relaxed_match_finds_a_short_reference_as_whole_words():
    assert relaxed_match("Yes, it is red.", ["yes"]) == 1.0
    assert relaxed_match("Yes, it is red.", ["red"]) == 1.0
    assert relaxed_match("The sign says stop here", ["stop here"]) == 1.0
    # Inside a word is not a match.
    assert relaxed_match("I am bored", ["red"]) == 0.0
    # Longer references must match as a whole.
    assert relaxed_match("it was a very long and winding road", ["long and winding road"]) == 0.0
    # A reference that normalises to nothing matches nothing.
    assert relaxed_match("a cat", ["the"]) == 0.0


def test_default_metric_by_dataset_name():
    assert default_metric("DocVQA_region_test_8cut") == "anls"
    assert default_metric("dude_region_test") == "anls"
    assert default_metric("TextVQA_region_test_8cut") == "vqa_accuracy"
    assert default_metric("GQA_region_test") == "relaxed_match"
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "anls", "relaxed_match"}


def test_score_accepts_one_reference_as_a_string():
    assert score("exact_match", "Two", "2") == 1.0
    assert score("anls", "kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)


def test_score_rejects_an_unknown_metric_naming_the_known_ones():
    with pytest.raises(ValueError, match="bleu") as error:
        score("bleu", "a", ["a"])
    assert all(name in str(error.value) for name in METRICS)
