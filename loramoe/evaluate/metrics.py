"""Answer metrics: SQuAD/TriviaQA normalisation, EM, token F1, contains, accuracy, ROUGE-L,
chrF. Every metric takes a prediction and the list of gold answers (aliases) and returns a
score in [0, 1] (the best over aliases)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from loramoe.data.records import normalize_text


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_text(prediction).split(), normalize_text(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold:
        return float(pred == gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    return max((_f1(prediction, a) for a in answers), default=0.0)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """Closed-book QA: the normalised answer appears as whole words in the prediction."""
    pred = f" {normalize_text(prediction)} "
    return float(any(normalize_text(a) and f" {normalize_text(a)} " in pred for a in answers))


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Classification / NLI / multiple choice: the prediction starts with the gold label."""
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(a) or pred.startswith(normalize_text(a) + " ")
                     for a in answers if normalize_text(a)))


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F-measure on lowercased word tokens (best over references)."""
    best = 0.0
    pred = prediction.lower().split()
    for answer in answers:
        gold = answer.lower().split()
        lcs = _lcs(pred, gold)
        if lcs:
            precision, recall = lcs / len(pred), lcs / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def chrf(prediction: str, answers: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, list(answers)).score / 100.0


METRIC_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "contains": contains,
    "accuracy": accuracy,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    try:
        return METRIC_FUNCTIONS[metric](prediction, answers)
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRIC_FUNCTIONS)}") from None
