"""Emotion detection among the 32 Empathetic Dialogues labels: a linear classifier on MiniLM embeddings."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from chatbot.embeddings import EMBEDDER_NAME, embed, load_embedder
from chatbot.runtime import ASSETS_DIR, DEFAULT_SEED

logger = logging.getLogger(__name__)

EMOTION_DIR = ASSETS_DIR / "emotion"
WEIGHTS_FILE, MANIFEST_FILE = "classifier.npz", "manifest.json"


@dataclass(frozen=True)
class EmotionPrediction:
    """The most likely emotion and the classifier's probability for it."""

    label: str
    score: float

    def to_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


class EmotionDetector:
    """Softmax-linear classifier over sentence embeddings; weights are plain arrays (no pickle)."""

    def __init__(self, embedder: SentenceTransformer, labels: Sequence[str], coef: np.ndarray, intercept: np.ndarray,
                 manifest: dict | None = None):
        """Wrap trained weights; `coef` is (labels, dim)."""
        self.embedder = embedder
        self.labels = list(labels)
        self.coef = np.asarray(coef, dtype=np.float32)
        self.intercept = np.asarray(intercept, dtype=np.float32)
        self.manifest = manifest or {}

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Label probabilities for embedded texts."""
        logits = vectors @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict_vectors(self, vectors: np.ndarray) -> list[EmotionPrediction]:
        """The top emotion for each already embedded text (retrieval and emotion share one embedding)."""
        probs = self.probabilities(vectors)
        best = probs.argmax(axis=1)
        return [EmotionPrediction(self.labels[i], round(float(p[i]), 4)) for i, p in zip(best, probs)]

    def predict_many(self, texts: Sequence[str]) -> list[EmotionPrediction]:
        """The top emotion for each text."""
        return self.predict_vectors(embed(self.embedder, list(texts)))

    def predict(self, text: str) -> EmotionPrediction:
        """The top emotion for one text."""
        return self.predict_many([text])[0]

    def save(self, out_dir: Path, extra: dict | None = None) -> Path:
        """Write weights and a manifest (embedder, labels, metrics)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(out_dir / WEIGHTS_FILE, coef=self.coef, intercept=self.intercept)
        manifest = {**self.manifest, **(extra or {}), "labels": self.labels}
        (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return out_dir

    @classmethod
    def load(cls, path: Path, embedder: SentenceTransformer, embedder_name: str = EMBEDDER_NAME) -> EmotionDetector:
        """Load saved weights, refusing ones trained on another embedder."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
            weights = np.load(path / WEIGHTS_FILE)
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot read emotion classifier at {path}: {err}") from err
        if manifest.get("embedder") != embedder_name:
            raise ValueError(f"Emotion classifier {path} was trained on {manifest.get('embedder')!r}, not {embedder_name!r}")
        return cls(embedder, manifest["labels"], weights["coef"], weights["intercept"], manifest)


def train_detector(
    embedder: SentenceTransformer, texts: Sequence[str], labels: Sequence[str], c: float = 4.0, seed: int = DEFAULT_SEED
) -> EmotionDetector:
    """Fit multinomial logistic regression on embedded texts."""
    from sklearn.linear_model import LogisticRegression

    vectors = embed(embedder, list(texts), batch_size=128, progress=True)
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(vectors, list(labels))
    manifest = {"embedder": EMBEDDER_NAME, "C": c, "train_texts": len(texts),
                "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return EmotionDetector(embedder, list(model.classes_), model.coef_, model.intercept_, manifest)


def accuracy(detector: EmotionDetector, texts: Sequence[str], gold: Sequence[str]) -> float:
    """Share of texts whose predicted emotion equals the gold label."""
    predictions = detector.predict_many(texts)
    return float(np.mean([p.label == g for p, g in zip(predictions, gold)]))


def load_emotion_detector(embedder: SentenceTransformer, path: Path = EMOTION_DIR) -> EmotionDetector | None:
    """The shipped detector, or None (with a warning) when it is missing or does not fit."""
    try:
        return EmotionDetector.load(path, embedder)
    except ValueError as err:
        logger.warning("Emotion detection off: %s (train it: python -m chatbot.emotion)", err)
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m chatbot.emotion`: train the emotion classifier on the train split and report test accuracy."""
    from chatbot.data import DataError, data_checksum, load_conversations

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", default=None, help="folder with train/valid/test.csv or the release .tar.gz")
    parser.add_argument("--out", default=str(EMOTION_DIR), help="folder to write classifier.npz and manifest.json")
    parser.add_argument("--c", type=float, default=4.0, help="inverse L2 regularisation strength")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train = load_conversations(args.data_dir, "train")
        test = [c for c in load_conversations(args.data_dir, "test") if c.emotion]
        checksum = data_checksum(args.data_dir, ["train"])
    except DataError as err:
        parser.exit(2, f"error: {err}\n")
    started = time.perf_counter()
    embedder = load_embedder()
    # First speaker turns and the written situations describe the same feeling; both teach the classifier.
    texts = [c.turns[0].text for c in train] + [c.situation for c in train]
    labels = [c.emotion for c in train] * 2
    detector = train_detector(embedder, texts, labels, c=args.c)
    acc = accuracy(detector, [c.turns[0].text for c in test], [c.emotion for c in test])
    detector.save(Path(args.out), {
        "test_accuracy_first_turn": round(acc, 4),
        "protocol": "test split, first speaker turn -> gold conversation emotion, 32 labels",
        "test_conversations": len(test),
        "data_checksum_train": checksum,
        "train_seconds": round(time.perf_counter() - started, 1),
    })
    print(f"emotion accuracy (test, first speaker turn, {len(test)} conversations): {acc:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
