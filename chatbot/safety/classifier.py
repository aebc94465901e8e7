"""The learned part of the crisis screen: one logistic regression, two thresholds.

Its features are the MiniLM sentence embedding (meaning) next to hashed word uni/bigram TF-IDF (the exact words:
"never", "won't need", "goodbye" carry signal that the embedding blurs), the same lexical features as the emotion
detector. `python train_safety.py` fits it on chatbot/safety/sentences/train.jsonl and writes assets/safety/
(weights in classifier.npz, everything else in manifest.json); `SafetyClassifier.load` checks that manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from chatbot.embeddings import EMBEDDER_NAME
from chatbot.emotion import HASH_FEATURES, LexicalFeatures
from chatbot.runtime import ASSETS_DIR

logger = logging.getLogger(__name__)

ARTIFACT_DIR = ASSETS_DIR / "safety"
SENTENCES_DIR = Path(__file__).resolve().parent / "sentences"
TRAIN_SENTENCES = SENTENCES_DIR / "train.jsonl"
HELDOUT_SENTENCES = SENTENCES_DIR / "heldout.jsonl"
FORMAT_VERSION = 2
CRISIS, CONCERN, NONE = "crisis", "concern", "none"
LABELS = (CRISIS, "safe")


class ClassifierLoadError(RuntimeError):
    """The shipped classifier is missing or does not fit the embedder in use."""


@dataclass(frozen=True)
class Sentence:
    """One labelled sentence: `label` is 'crisis' or 'safe'; `category` says which kind (goodbye, hyperbole, ...)."""

    text: str
    label: str
    category: str
    lang: str = "en"

    @property
    def is_crisis(self) -> bool:
        """Whether the sentence is labelled crisis."""
        return self.label == CRISIS


def load_sentences(path: Path) -> list[Sentence]:
    """Read a JSONL file of labelled sentences, with a clear error for a bad line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = Sentence(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a sentence record ({err})") from None
        if row.label not in LABELS:
            raise ValueError(f"{path}:{number}: label must be one of {LABELS}, not {row.label!r}")
        rows.append(row)
    return rows


def features(vectors: np.ndarray, texts: list[str], lexical: LexicalFeatures) -> sparse.csr_matrix:
    """One row per text: its L2-normalised embedding, then its L2-normalised lexical features."""
    return sparse.hstack([sparse.csr_matrix(vectors), lexical.transform(texts)], format="csr")


@dataclass(frozen=True)
class SafetyClassifier:
    """P(crisis) for normalised texts and their embeddings, and the two tiers' thresholds."""

    coef: np.ndarray  # embedding dims, then HASH_FEATURES lexical columns
    intercept: float
    idf: np.ndarray
    crisis_threshold: float
    concern_threshold: float
    manifest: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Embedding dimensions the classifier expects."""
        return int(self.coef.shape[0] - self.idf.shape[0])

    def probabilities(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        """P(crisis) for each normalised text, given its L2-normalised embedding."""
        logits = features(vectors, texts, LexicalFeatures(self.idf)) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(logits).ravel()))

    def tier(self, probability: float) -> str:
        """'crisis', 'concern' or 'none' for one probability."""
        if probability >= self.crisis_threshold:
            return CRISIS
        return CONCERN if probability >= self.concern_threshold else NONE

    def save(self, folder: Path = ARTIFACT_DIR) -> None:
        """Write classifier.npz and manifest.json (with the thresholds) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / "classifier.npz", coef=self.coef.astype(np.float16),
                            intercept=np.float32(self.intercept), idf=self.idf.astype(np.float32))
        manifest = dict(self.manifest, format_version=FORMAT_VERSION, dim=self.dim,
                        thresholds={CRISIS: self.crisis_threshold, CONCERN: self.concern_threshold})
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path = ARTIFACT_DIR, embedder_name: str = EMBEDDER_NAME) -> SafetyClassifier:
        """Load a saved classifier; the manifest must name this format and the embedder in use."""
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            arrays = np.load(folder / "classifier.npz")
            coef, intercept, idf = arrays["coef"].astype(np.float32), float(arrays["intercept"]), arrays["idf"]
        except (OSError, KeyError, ValueError) as err:
            raise ClassifierLoadError(
                f"No usable crisis classifier in {folder} ({err}); run `python train_safety.py` to build it"
            ) from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ClassifierLoadError(f"{folder}: format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
        if manifest.get("embedder") != embedder_name or manifest.get("dim") != coef.shape[0] - idf.shape[0]:
            raise ClassifierLoadError(
                f"{folder} was trained on {manifest.get('embedder')} ({manifest.get('dim')} dims), "
                f"not {embedder_name}; retrain with `python train_safety.py`"
            )
        thresholds = manifest["thresholds"]
        logger.info("Crisis classifier loaded from %s (crisis >= %.3f, concern >= %.3f)",
                    folder, thresholds[CRISIS], thresholds[CONCERN])
        return cls(coef, intercept, idf, thresholds[CRISIS], thresholds[CONCERN], manifest)


def lowest_threshold(probabilities: np.ndarray, is_crisis: np.ndarray, max_false_alarms: float) -> float:
    """The lowest threshold at which at most `max_false_alarms` of the non-crisis sentences score at or above it."""
    safe = np.sort(probabilities[~is_crisis])[::-1]
    allowed = int(np.floor(max_false_alarms * len(safe)))
    # Just above the (allowed+1)-th highest non-crisis score: that sentence and all below it stay under.
    return float(np.nextafter(safe[allowed], 1.0)) if allowed < len(safe) else 0.0


def rates(probabilities: np.ndarray, is_crisis: np.ndarray, threshold: float) -> dict:
    """Recall and false-alarm rate of `probabilities >= threshold`."""
    flagged = probabilities >= threshold
    return {"recall": float(flagged[is_crisis].mean()), "false_alarms": float(flagged[~is_crisis].mean())}


def near_duplicates(vectors: np.ndarray, others: np.ndarray, limit: float) -> list[tuple[int, int, float]]:
    """(row in vectors, row in others, cosine) for every pair at or above `limit` (rows L2-normalised)."""
    similarity = vectors @ others.T
    return [(int(i), int(j), float(similarity[i, j])) for i, j in zip(*np.nonzero(similarity >= limit))]


def train_classifier(
    texts: list[str],
    vectors: np.ndarray,
    is_crisis: np.ndarray,
    c_grid: tuple[float, ...],
    folds: int,
    crisis_false_alarms: float,
    concern_false_alarms: float,
    seed: int,
) -> SafetyClassifier:
    """Pick C (average precision) and both thresholds on out-of-fold predictions, then fit on every sentence.

    Each sentence is scored by a model that never saw it (stratified k-fold, idf refitted per fold), so the
    thresholds are chosen on validation predictions that cover the whole training set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    def fit(rows: np.ndarray, c: float) -> tuple[LogisticRegression, LexicalFeatures]:
        lexical = LexicalFeatures.fit([texts[i] for i in rows])
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
        return model.fit(features(vectors[rows], [texts[i] for i in rows], lexical), is_crisis[rows]), lexical

    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(vectors, is_crisis))
    out_of_fold = {}
    for c in c_grid:
        probs = np.zeros(len(texts))
        for train_rows, val_rows in splits:
            model, lexical = fit(train_rows, c)
            probs[val_rows] = model.predict_proba(features(vectors[val_rows], [texts[i] for i in val_rows], lexical))[:, 1]
        out_of_fold[c] = (float(average_precision_score(is_crisis, probs)), probs)
    best_c = max(out_of_fold, key=lambda c: out_of_fold[c][0])
    probs = out_of_fold[best_c][1]
    crisis_t = lowest_threshold(probs, is_crisis, crisis_false_alarms)
    concern_t = min(crisis_t, lowest_threshold(probs, is_crisis, concern_false_alarms))
    model, lexical = fit(np.arange(len(texts)), best_c)
    manifest = {
        "model": "sklearn LogisticRegression (class_weight=balanced) on [MiniLM embedding, hashed word 1-2-gram "
                 f"TF-IDF ({HASH_FEATURES} columns)] of the normalised text",
        "C": best_c,
        "validation": f"{folds}-fold stratified out-of-fold predictions over the training sentences",
        "validation_average_precision_by_C": {str(c): round(out_of_fold[c][0], 4) for c in c_grid},
        "seed": seed,
        "threshold_rules": {
            CRISIS: f"lowest threshold with <= {crisis_false_alarms:.1%} validation false alarms",
            CONCERN: f"lowest threshold with <= {concern_false_alarms:.1%} validation false alarms",
        },
        "validation_rates": {CRISIS: rates(probs, is_crisis, crisis_t), CONCERN: rates(probs, is_crisis, concern_t)},
    }
    return SafetyClassifier(model.coef_[0].astype(np.float32), float(model.intercept_[0]), lexical.idf,
                            crisis_t, concern_t, manifest)
