"""Offline answer metrics: exact match, VQA accuracy, ANLS and a relaxed match for short answers.

Every metric takes a prediction and a list of references and returns a float in [0, 1]; none
needs a service, so they can score a run where no LLM judge is reachable.
"""

import math
import re

ARTICLES = {"a", "an", "the"}
# The VQA eval also maps "none" to "0": answers to counting questions are written either way.
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Contractions written without their apostrophe are put back. Spellings that are also English
# words ("cant" aside, which the VQA eval fixes too) are left out: "its", "lets", "shed", "well".
CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't",
        "hasn't", "haven't", "he'd", "he's", "how'd", "how'll", "how's", "isn't", "it'd", "it'll",
        "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "o'clock", "shan't",
        "should've", "shouldn't", "that's", "there'd", "there're", "there's", "they'd", "they'll",
        "they're", "they've", "wasn't", "we've", "weren't", "what'll", "what're", "what's", "what've",
        "when's", "where'd", "where's", "who'd", "who'll", "who's", "who've", "why's", "won't",
        "would've", "wouldn't", "y'all", "you'd", "you'll", "you're", "you've",
    )
}
# The VQA eval's punctuation set: apostrophes, colons and periods are handled apart.
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period that is not a decimal point ("3.5" keeps it, "red." loses it).
SENTENCE_PERIOD = re.compile(r"\.(?!\d)")

RELATIVE_TOLERANCE = 0.05
MAX_PHRASE_WORDS = 3


def normalize_answer(text: str) -> str:
    """The VQA eval's answer normalisation (punctuation, case, articles, number words, contractions)."""
    original = text.replace("\n", " ").replace("\t", " ").strip()
    # As in the VQA eval: punctuation next to a space in the original text (or any mark, in a
    # text with a digit group like "1,000") is dropped; elsewhere it separates words
    # ("black/white" -> "black white").
    drop_all = DIGIT_COMMA_DIGIT.search(original) is not None
    text = original
    for mark in PUNCTUATION:
        spaced = mark + " " in original or " " + mark in original
        text = text.replace(mark, "" if spaced or drop_all else " ")
    text = SENTENCE_PERIOD.sub("", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(reference) for reference in references))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy, min(#references matching the prediction / 3, 1), on normalised strings.

    This is the usual closed form; the official eval averages it over the 10 leave-one-out
    subsets of its 10 human answers, which differs only when 1 to 3 annotators agree. With
    fewer than 3 references full credit needs all of them, so one reference gives exact match.
    """
    if not references:
        return 0.0
    predicted = normalize_answer(prediction)
    matches = sum(predicted == normalize_answer(reference) for reference in references)
    return min(matches / min(3, len(references)), 1.0)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question, as DocVQA and DUDE score it."""

    def clean(text: str) -> str:
        return " ".join(text.lower().split())

    predicted = clean(prediction)
    best = 0.0
    for reference in references:
        expected = clean(reference)
        longest = max(len(predicted), len(expected))
        distance = levenshtein(predicted, expected) / longest if longest else 0.0
        # Above the threshold the answer is taken as wrong, not as partly right.
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def parse_number(text: str) -> float | None:
    """A number written as "1,234", "12.5", "$3" or "45%" (as a fraction), else None."""
    text = text.strip().rstrip(".").replace(",", "").lstrip("$")
    # ChartQA compares "45%" with "0.45".
    scale = 0.01 if text.endswith("%") else 1.0
    try:
        number = float(text.rstrip("%")) * scale
    except ValueError:
        return None
    # float() also reads "nan" and "inf", which are words here, not numbers.
    return number if math.isfinite(number) else None


def relaxed_match(prediction: str, references: list[str]) -> float:
    """1.0 for an exact match, a number within 5% (ChartQA), or a short reference said in the answer."""
    predicted = normalize_answer(prediction)
    predicted_number = parse_number(prediction)
    for reference in references:
        expected = normalize_answer(reference)
        if predicted == expected:
            return 1.0
        expected_number = parse_number(reference)
        if predicted_number is not None and expected_number is not None:
            if expected_number == 0:
                if predicted_number == 0:
                    return 1.0
            elif abs(predicted_number - expected_number) / abs(expected_number) <= RELATIVE_TOLERANCE:
                return 1.0
        # Whole words only, so "red" is found in "it is red" but not in "bored".
        if expected and len(expected.split()) <= MAX_PHRASE_WORDS and f" {expected} " in f" {predicted} ":
            return 1.0
    return 0.0


METRICS = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_match": relaxed_match,
}


def default_metric(dataset_name: str) -> str:
    """The metric a benchmark is usually reported with."""
    name = dataset_name.lower()
    if "docvqa" in name or "dude" in name:
        return "anls"
    if "textvqa" in name:
        return "vqa_accuracy"
    return "relaxed_match"


def score(metric_name: str, prediction: str, references: str | list[str]) -> float:
    """Score one prediction with a metric named in METRICS; one reference may be given as a str."""
    if metric_name not in METRICS:
        raise ValueError(f"unknown metric {metric_name!r}; known metrics: {', '.join(METRICS)}")
    if isinstance(references, str):
        references = [references]
    return METRICS[metric_name](prediction, references)
