"""Emotion detection among the 32 Empathetic Dialogues labels.

Two linear classifiers, averaged: one on the MiniLM embedding (meaning), one on hashed word n-grams
(the exact words: "proud", "jealous", "scared" carry most of the signal). Weights are plain arrays
(no pickle) and hashed features store no text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer

from chatbot.data import SPEAKER, Turn
from chatbot.embeddings import EMBEDDER_NAME, Embedder, embed, read_head, save_head
from chatbot.runtime import ASSETS_DIR, DEFAULT_SEED

logger = logging.getLogger(__name__)

EMOTION_DIR = ASSETS_DIR / "emotion"
WEIGHTS_FILE = "classifier.npz"
HASH_FEATURES = 2**15  # n-grams hashed into 32k columns: ~2 MB of float16 weights, few collisions
# n-gram range per analyzer: word uni+bigrams keep the exact words; character 3-5-grams inside words also match
# misspelt and inflected forms ("kil", "k1ll", "killing") that a word vocabulary treats as unrelated.
NGRAMS = {"word": (1, 2), "char_wb": (3, 5)}


def _hasher(n_features: int, analyzer: str) -> HashingVectorizer:
    return HashingVectorizer(n_features=n_features, analyzer=analyzer, ngram_range=NGRAMS[analyzer],
                             alternate_sign=False, norm=None)


@dataclass(frozen=True)
class EmotionPrediction:
    """The most likely emotion and the classifier's probability for it."""

    label: str
    score: float

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


def speaker_text(turns: Sequence[Turn]) -> str:
    """What emotion is read from: the user's (speaker's) own turns, so the bot's replies never sway it."""
    return "\n".join(turn.text for turn in turns if turn.role == SPEAKER)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


class LexicalFeatures:
    """Sublinear TF-IDF over hashed word (or character) n-grams, L2-normalised (sklearn's TfidfTransformer, without state)."""

    def __init__(self, idf: np.ndarray, analyzer: str = "word"):
        """Wrap learned inverse document frequencies for one of NGRAMS' analyzers."""
        self.idf = np.asarray(idf, dtype=np.float32)
        self.hasher = _hasher(len(self.idf), analyzer)

    @staticmethod
    def fit(texts: Sequence[str], analyzer: str = "word") -> LexicalFeatures:
        """Learn smoothed idf from texts."""
        df = np.bincount(_hasher(HASH_FEATURES, analyzer).transform(texts).indices, minlength=HASH_FEATURES)
        return LexicalFeatures(np.log((1 + len(texts)) / (1 + df)) + 1, analyzer)

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """Feature rows for texts."""
        x = self.hasher.transform(texts).astype(np.float32)
        x.data = 1 + np.log(x.data)
        x = x.multiply(self.idf).tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
        return sparse.diags(1 / np.maximum(norms, 1e-12)) @ x


class EmotionDetector:
    """Average of a semantic and a lexical softmax-linear classifier."""

    def __init__(self, embedder: Embedder, labels: Sequence[str], dense: tuple[np.ndarray, np.ndarray],
                 lexical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, weight: float = 0.5,
                 manifest: dict | None = None):
        """`dense` = (coef (labels, dim), intercept); `lexical` = (coef (labels, features), intercept, idf)."""
        self.embedder = embedder
        self.labels = list(labels)
        self.dense_coef, self.dense_bias = (np.asarray(a, dtype=np.float32) for a in dense)
        self.lexical = None
        if lexical is not None:
            coef, bias, idf = lexical
            self.lexical = (np.asarray(coef, dtype=np.float32), np.asarray(bias, dtype=np.float32), LexicalFeatures(idf))
        self.weight = weight  # share of the semantic classifier in the average
        self.manifest = manifest or {}

    def probabilities(self, texts: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Label probabilities for texts whose embeddings are `vectors` (retrieval shares that embedding)."""
        probs = _softmax(vectors @ self.dense_coef.T + self.dense_bias)
        if self.lexical is not None:
            coef, bias, features = self.lexical
            lexical = _softmax(np.asarray(features.transform(texts) @ coef.T) + bias)
            probs = self.weight * probs + (1 - self.weight) * lexical
        return probs

    def predict_batch(self, texts: Sequence[str], vectors: np.ndarray) -> list[EmotionPrediction]:
        """The top emotion for each already embedded text."""
        probs = self.probabilities(texts, vectors)
        return [EmotionPrediction(self.labels[i], round(float(p[i]), 4)) for i, p in zip(probs.argmax(axis=1), probs)]

    def predict_many(self, texts: Sequence[str]) -> list[EmotionPrediction]:
        """The top emotion for each text."""
        return self.predict_batch(texts, embed(self.embedder, list(texts)))

    def predict(self, text: str) -> EmotionPrediction:
        """The top emotion for one text."""
        return self.predict_many([text])[0]

    def predict_dialogue(self, turns: Sequence[Turn]) -> EmotionPrediction:
        """The user's emotion in a dialogue, read from the user's own turns only."""
        return self.predict(speaker_text(turns))

    def save(self, out_dir: Path, extra: dict | None = None) -> Path:
        """Write weights (float16 for the large lexical matrix) and a manifest (embedder, labels, metrics)."""
        arrays = {"dense_coef": self.dense_coef, "dense_bias": self.dense_bias}
        if self.lexical is not None:
            coef, bias, features = self.lexical
            arrays.update(lexical_coef=coef.astype(np.float16), lexical_bias=bias, idf=features.idf)
        manifest = {**self.manifest, **(extra or {}), "weight": self.weight, "labels": self.labels}
        return save_head(out_dir, WEIGHTS_FILE, arrays, manifest)

    @classmethod
    def load(cls, path: Path, embedder: Embedder, embedder_name: str = EMBEDDER_NAME) -> EmotionDetector:
        """Load saved weights, refusing ones trained on another embedder."""
        try:
            manifest, w = read_head(path, WEIGHTS_FILE)
            lexical = (w["lexical_coef"], w["lexical_bias"], w["idf"]) if "lexical_coef" in w else None
            dense = (w["dense_coef"], w["dense_bias"])
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"Cannot read emotion classifier at {path}: {err}") from err
        if manifest.get("embedder") != embedder_name:
            raise ValueError(f"Emotion classifier {path} was trained on {manifest.get('embedder')!r}, not {embedder_name!r}")
        return cls(embedder, manifest["labels"], dense, lexical, manifest.get("weight", 0.5), manifest)


def _fit_linear(x, labels: Sequence[str], c: float, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, list(labels))
    return list(model.classes_), model.coef_, model.intercept_


def train_detector(
    embedder: Embedder,
    dense_vectors: np.ndarray,
    dense_labels: Sequence[str],
    lexical_texts: Sequence[str],
    lexical_labels: Sequence[str],
    weight: float = 0.5,
    dense_c: float = 1.0,
    lexical_c: float = 2.0,
    seed: int = DEFAULT_SEED,
) -> EmotionDetector:
    """Fit the semantic classifier on embeddings and the lexical one on texts (same label set; C = 1 / L2 strength)."""
    labels, dense_coef, dense_bias = _fit_linear(dense_vectors, dense_labels, dense_c, seed)
    features = LexicalFeatures.fit(lexical_texts)
    lexical_classes, lex_coef, lex_bias = _fit_linear(features.transform(lexical_texts), lexical_labels, lexical_c,
                                                      seed)
    if lexical_classes != labels:
        raise ValueError("The semantic and lexical training sets must cover the same emotion labels")
    manifest = {"embedder": EMBEDDER_NAME, "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "dense_examples": len(dense_labels), "lexical_examples": len(lexical_labels)}
    return EmotionDetector(embedder, labels, (dense_coef, dense_bias), (lex_coef, lex_bias, features.idf), weight,
                           manifest)


def accuracy(detector: EmotionDetector, texts: Sequence[str], gold: Sequence[str]) -> float:
    """Share of texts whose predicted emotion equals the gold label."""
    predictions = detector.predict_many(texts)
    return float(np.mean([p.label == g for p, g in zip(predictions, gold)]))


def load_emotion_detector(embedder: Embedder, path: Path = EMOTION_DIR) -> EmotionDetector | None:
    """The shipped detector, or None (with a warning) when it is missing or does not fit."""
    try:
        return EmotionDetector.load(path, embedder)
    except ValueError as err:
        logger.warning("Emotion detection off: %s (train it: python train_emotion.py)", err)
        return None
