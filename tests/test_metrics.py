"""Reply metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from chatbot import metrics


def test_words_keep_punctuation_and_contractions_lowercased():
    assert metrics.words("Hello, world! It's fine.") == ["hello", ",", "world", "!", "it's", "fine", "."]
    assert metrics.content_words("Hello, world! It's fine.") == ["hello", "world", "it's", "fine"]


def test_distinct_n_counts_unique_ngrams_over_all_replies():
    # unigrams a b a b c: 3 distinct of 5; bigrams (a b) (b a) (b c): 3 of 3
    assert metrics.distinct_n(["a b a", "b c"], 1) == pytest.approx(60.0)
    assert metrics.distinct_n(["a b a", "b c"], 2) == pytest.approx(100.0)
    assert metrics.distinct_n(["a a a a"], 2) == pytest.approx(100 / 3)
    assert metrics.distinct_n([""], 1) == 0.0


def test_repeated_trigram_within_a_reply():
    assert metrics.repeats_ngram("I am sad and I am sad")
    assert not metrics.repeats_ngram("I am sad, and so am I.")


@pytest.mark.parametrize("reply, echo", [
    ("I had a hard day", True),  # copied words
    ("had a hard day at work today", True),  # 4 of 5 word 3-grams copied = 80%
    ("had a hard day at home", False),  # 3 of 4 = 75%
    ("That sounds exhausting. What happened?", False),
    ("", False),
])
def test_echo_detection(reply, echo):
    assert metrics.is_echo(reply, ["I had a hard day at work"]) is echo


def test_mean_length_counts_words_not_punctuation():
    assert metrics.mean_length(["Hi there.", "Okay"]) == pytest.approx(1.5)


def test_bleu_by_hand():
    assert metrics.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # clipped unigram precision 1/3, hypothesis longer than the reference (no brevity penalty)
    assert metrics.corpus_bleu(["the the the"], ["the cat"], max_order=1) == pytest.approx(100 / 3, rel=1e-4)
    assert metrics.average_sentence_bleu(["you must be proud"], ["you must be proud"]) == pytest.approx(100.0)


def test_rouge_l_by_hand():
    # LCS 3: precision 3/3, recall 3/6, F1 = 2/3
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3, rel=1e-4)


def test_precision_at_1_needs_the_gold_strictly_first():
    scores = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.1, 0.3, 0.2]])
    assert metrics.precision_at_1(scores) == pytest.approx(100 / 3)


def test_label_agreement_of_top_k():
    retrieved = [["joy", "sad", "joy"], ["joy", "joy", "sad"]]
    assert metrics.label_agreement(["joy", "sad"], retrieved, 1) == pytest.approx(50.0)
    assert metrics.label_agreement(["joy", "sad"], retrieved, 3) == pytest.approx(50.0)
