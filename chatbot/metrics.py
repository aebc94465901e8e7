"""Reply-quality metrics for eval.py: BLEU, ROUGE-L, Distinct-n, repetition, echo, length, P@1,N.

Every function is pure (lists of strings or score arrays in, numbers out) so tests can check it by hand.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# Words and single punctuation marks, lowercased: the tokenization behind Distinct-n, lengths, repetition and echo.
WORD_PATTERN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")
ECHO_OVERLAP = 0.8  # a reply whose word 3-grams mostly come from the conversation is an echo


def words(text: str) -> list[str]:
    """Lowercased word and punctuation tokens (punctuation kept: Distinct-n counts it, as in the EmpDG/CEM code)."""
    return WORD_PATTERN.findall(text.lower())


def content_words(text: str) -> list[str]:
    """`words` without the punctuation marks."""
    return [w for w in words(text) if w[0].isalnum() or w[0] == "_"]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Contiguous n-grams of a token list."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all replies, x100 (0 when there are none)."""
    grams = [g for reply in replies for g in ngrams(words(reply), n)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def repeats_ngram(reply: str, n: int = 3) -> bool:
    """Whether some word n-gram occurs twice within one reply (a looping reply)."""
    counts = Counter(ngrams(content_words(reply), n))
    return any(c > 1 for c in counts.values())


def is_echo(reply: str, conversation: Sequence[str]) -> bool:
    """Whether a reply copies the conversation: its words appear there as they are, or most of its 3-grams do."""
    said, mine = content_words(" ".join(conversation)), content_words(reply)
    if not mine:
        return False
    if f" {' '.join(mine)} " in f" {' '.join(said)} ":
        return True
    grams = ngrams(mine, 3)
    if not grams:
        return False
    seen = set(ngrams(said, 3))
    return sum(g in seen for g in grams) / len(grams) >= ECHO_OVERLAP


def mean_length(replies: Sequence[str]) -> float:
    """Mean number of words (punctuation not counted) per reply."""
    counts = [len(content_words(r)) for r in replies]
    return float(np.mean(counts)) if counts else 0.0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """sacrebleu corpus BLEU (13a tokenization, one reference) up to `max_order`-grams, x100."""
    from sacrebleu.metrics import BLEU

    return float(BLEU(max_ngram_order=max_order).corpus_score(list(hypotheses), [list(references)]).score)


def average_sentence_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean sacrebleu sentence BLEU-4 (exponential smoothing), x100."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    return float(np.mean(scores)) if scores else 0.0


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge_score, Porter stemming), x100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return 100.0 * float(np.mean(scores)) if scores else 0.0


def precision_at_1(scores: np.ndarray) -> float:
    """Share of rows whose gold candidate (column 0) scores strictly above every other candidate, x100."""
    if scores.size == 0:
        return 0.0
    return 100.0 * float(np.mean(scores[:, 0] > scores[:, 1:].max(axis=1)))


def label_agreement(gold: Sequence[str], retrieved: Sequence[Sequence[str]], k: int) -> float:
    """Mean share of the top-k retrieved labels equal to the gold label, x100."""
    shares = [sum(label == g for label in labels[:k]) / k for g, labels in zip(gold, retrieved)]
    return 100.0 * float(np.mean(shares)) if shares else 0.0
