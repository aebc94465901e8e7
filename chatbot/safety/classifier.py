"""The learned part of the crisis screen: one logistic regression, two thresholds.

Its features are the sentence embedding of MiniLM with a LoRA adapter trained for the screen (meaning), next to
hashed word uni/bigram TF-IDF (the exact words: "never", "won't need", "goodbye" carry signal that the embedding
blurs), the same lexical features as the emotion detector, and hashed character 3-5-gram TF-IDF (misspelt and
slang forms the word features miss). `python train_safety.py` fits it on chatbot/safety/sentences/train.jsonl and
writes assets/safety/ (weights and the adapter in classifier.npz, everything else in manifest.json);
`SafetyClassifier.load` checks that manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from chatbot.embeddings import (
    EMBEDDER_NAME,
    Embedder,
    adapted_embedder,
    adapter_digest,
    embed,
    lora_arguments,
    trainable,
)
from chatbot.emotion import HASH_FEATURES, LexicalFeatures
from chatbot.runtime import ASSETS_DIR, set_seed

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

ARTIFACT_DIR = ASSETS_DIR / "safety"
SENTENCES_DIR = Path(__file__).resolve().parent / "sentences"
TRAIN_SENTENCES = SENTENCES_DIR / "train.jsonl"
HELDOUT_SENTENCES = SENTENCES_DIR / "heldout.jsonl"
# Both frozen: the second was written on 2026-12-06, before the training sentences added that day, and is
# measured as the one set nobody had looked at while changing the screen (README: Safety).
HELDOUT_SETS = (HELDOUT_SENTENCES, SENTENCES_DIR / "heldout-2.jsonl")
FORMAT_VERSION = 3
CRISIS, CONCERN, NONE = "crisis", "concern", "none"
LABELS = (CRISIS, "safe")
LORA_PREFIX = "lora/"  # classifier.npz keys of the encoder adapter's weights


@dataclass(frozen=True)
class EncoderTuning:
    """How train_safety.py fine-tunes the embedder for the screen: a LoRA adapter trained with a logistic head."""

    epochs: int = 8  # 0 keeps the embedder frozen; 8 ranked best in validation among 3, 5 and 8 (README: Safety)
    lr: float = 5e-4  # for the LoRA weights (the head uses 1e-2); a full fine-tune at 3e-5 did no better
    rank: int = 8  # on all 36 linear layers; rank 16 did no better in validation
    batch_size: int = 32

    @property
    def lora(self) -> dict:
        """peft LoraConfig arguments of the adapter (also what the manifest records)."""
        return lora_arguments(self.rank)


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


def features(vectors: np.ndarray, texts: list[str], words: LexicalFeatures, chars: LexicalFeatures) -> sparse.csr_matrix:
    """One row per text: its L2-normalised embedding, then its L2-normalised word and character n-gram features."""
    return sparse.hstack([sparse.csr_matrix(vectors), words.transform(texts), chars.transform(texts)], format="csr")


@dataclass(frozen=True)
class SafetyClassifier:
    """P(crisis) for normalised texts and their embeddings, and the two tiers' thresholds."""

    coef: np.ndarray  # embedding dims, then the word columns, then the character columns
    intercept: float
    idf: np.ndarray  # word n-grams
    char_idf: np.ndarray  # character n-grams
    crisis_threshold: float
    concern_threshold: float
    manifest: dict = field(default_factory=dict)
    lora_config: dict | None = None  # peft LoraConfig arguments of the embedder's adapter; None: the embedder as is
    lora_weights: dict[str, np.ndarray] = field(default_factory=dict)  # peft state dict of that adapter

    @property
    def dim(self) -> int:
        """Embedding dimensions the classifier expects."""
        return int(self.coef.shape[0] - self.idf.shape[0] - self.char_idf.shape[0])

    def probabilities(self, texts: list[str], vectors: np.ndarray) -> np.ndarray:
        """P(crisis) for each normalised text, given its L2-normalised embedding."""
        lexical = LexicalFeatures(self.idf), LexicalFeatures(self.char_idf, "char_wb")
        logits = features(vectors, texts, *lexical) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(logits).ravel()))

    def encoder(self, embedder: Embedder) -> Embedder:
        """The embedder this classifier reads: the shared one, or a copy with the trained adapter merged in."""
        if self.lora_config is None:
            return embedder
        return adapted_embedder(embedder, self.lora_config, self.lora_weights, adapter_digest(self.lora_weights))

    def tier(self, probability: float) -> str:
        """'crisis', 'concern' or 'none' for one probability."""
        if probability >= self.crisis_threshold:
            return CRISIS
        return CONCERN if probability >= self.concern_threshold else NONE

    def save(self, folder: Path = ARTIFACT_DIR) -> None:
        """Write classifier.npz and manifest.json (with the thresholds) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / "classifier.npz", coef=self.coef.astype(np.float16),
                            intercept=np.float32(self.intercept), idf=self.idf.astype(np.float32),
                            char_idf=self.char_idf.astype(np.float32),
                            **{LORA_PREFIX + name: value for name, value in self.lora_weights.items()})
        adapter = None if self.lora_config is None else {"lora": self.lora_config, "sha256": adapter_digest(self.lora_weights)}
        manifest = dict(self.manifest, format_version=FORMAT_VERSION, dim=self.dim, encoder_adapter=adapter,
                        thresholds={CRISIS: self.crisis_threshold, CONCERN: self.concern_threshold})
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path = ARTIFACT_DIR, embedder_name: str = EMBEDDER_NAME) -> SafetyClassifier:
        """Load a saved classifier; the manifest must name this format and the embedder in use."""
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            arrays = np.load(folder / "classifier.npz")
            coef, intercept = arrays["coef"].astype(np.float32), float(arrays["intercept"])
            idf, char_idf = arrays["idf"], arrays["char_idf"]
            lora = {key[len(LORA_PREFIX):]: arrays[key] for key in arrays.files if key.startswith(LORA_PREFIX)}
        except (OSError, KeyError, ValueError) as err:
            raise ClassifierLoadError(
                f"No usable crisis classifier in {folder} ({err}); run `python train_safety.py` to build it"
            ) from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ClassifierLoadError(f"{folder}: format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
        if manifest.get("embedder") != embedder_name or manifest.get("dim") != len(coef) - len(idf) - len(char_idf):
            raise ClassifierLoadError(
                f"{folder} was trained on {manifest.get('embedder')} ({manifest.get('dim')} dims), "
                f"not {embedder_name}; retrain with `python train_safety.py`"
            )
        adapter = manifest.get("encoder_adapter")
        if adapter is not None and adapter["sha256"] != adapter_digest(lora):
            raise ClassifierLoadError(f"{folder}: the encoder adapter's weights do not match its manifest; "
                                      "retrain with `python train_safety.py`")
        thresholds = manifest["thresholds"]
        logger.info("Crisis classifier loaded from %s (crisis >= %.3f, concern >= %.3f)",
                    folder, thresholds[CRISIS], thresholds[CONCERN])
        return cls(coef, intercept, idf, char_idf, thresholds[CRISIS], thresholds[CONCERN], manifest,
                   None if adapter is None else adapter["lora"], lora)


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


def tune_encoder(embedder: Embedder, texts: list[str], is_crisis: np.ndarray, tuning: EncoderTuning,
                 seed: int) -> SentenceTransformer:
    """A copy of the embedder whose transformer carries a LoRA adapter trained to tell crisis texts from the rest."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, inject_adapter_in_model
    from sentence_transformers.util import batch_to_device
    from tqdm.auto import trange

    set_seed(seed)
    model = trainable(embedder)
    inject_adapter_in_model(LoraConfig(**tuning.lora, lora_dropout=0.1), model[0].auto_model)  # peft's low-level API: adapter layers, no wrapper
    head = torch.nn.Linear(model.get_embedding_dimension(), 1).to(model.device)
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": tuning.lr},
                                   {"params": head.parameters(), "lr": 1e-2}])
    labels = torch.as_tensor(is_crisis, dtype=torch.float32, device=model.device)
    positive_weight = (1 - labels).sum() / labels.sum()  # balanced classes, as the logistic regression's
    order = np.random.default_rng(seed)
    model.train()
    for _ in trange(tuning.epochs, desc="Tuning the encoder"):
        for batch in np.array_split(order.permutation(len(texts)), -(-len(texts) // tuning.batch_size)):
            tokens = batch_to_device(model.preprocess([texts[i] for i in batch]), model.device)
            vectors = F.normalize(model(tokens)["sentence_embedding"], dim=-1)
            # Unit vectors give logits in [-|w|, |w|]; the factor lets the head reach confident scores early.
            logits = head(vectors * 10).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, labels[batch], pos_weight=positive_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def train_classifier(
    texts: list[str],
    is_crisis: np.ndarray,
    embedder: Embedder,
    tuning: EncoderTuning,
    c_grid: tuple[float, ...],
    folds: int,
    crisis_false_alarms: float,
    concern_false_alarms: float,
    seed: int,
) -> SafetyClassifier:
    """Pick C (average precision) and both thresholds on out-of-fold predictions, then fit on every sentence.

    Each sentence is scored by a model that never saw it (stratified k-fold; the encoder adapter and idf are
    trained again per fold), so the thresholds are chosen on validation predictions covering the whole set.
    """
    from peft import get_peft_model_state_dict
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    def encoder(rows: np.ndarray) -> Embedder:
        if not tuning.epochs:
            return embedder
        return tune_encoder(embedder, [texts[i] for i in rows], is_crisis[rows], tuning, seed)

    def fit(rows: np.ndarray, c: float, vectors: np.ndarray) -> tuple[LogisticRegression, tuple[LexicalFeatures, ...]]:
        seen = [texts[i] for i in rows]
        lexical = LexicalFeatures.fit(seen), LexicalFeatures.fit(seen, "char_wb")
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
        return model.fit(features(vectors[rows], seen, *lexical), is_crisis[rows]), lexical

    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, is_crisis))
    fold_vectors = [embed(encoder(train_rows), texts) for train_rows, _ in splits]
    out_of_fold = {}
    for c in c_grid:
        probs = np.zeros(len(texts))
        for (train_rows, val_rows), vectors in zip(splits, fold_vectors):
            model, lexical = fit(train_rows, c, vectors)
            probs[val_rows] = model.predict_proba(features(vectors[val_rows], [texts[i] for i in val_rows], *lexical))[:, 1]
        out_of_fold[c] = (float(average_precision_score(is_crisis, probs)), probs)
    best_c = max(out_of_fold, key=lambda c: out_of_fold[c][0])
    probs = out_of_fold[best_c][1]
    crisis_t = lowest_threshold(probs, is_crisis, crisis_false_alarms)
    concern_t = min(crisis_t, lowest_threshold(probs, is_crisis, concern_false_alarms))
    everything = np.arange(len(texts))
    tuned = encoder(everything)
    model, lexical = fit(everything, best_c, embed(tuned, texts))
    lora_config, lora_weights = None, {}
    if tuning.epochs:
        lora_config = tuning.lora
        lora_weights = {k: v.detach().cpu().numpy() for k, v in get_peft_model_state_dict(tuned[0].auto_model).items()}
    embedding = f"MiniLM embedding with a LoRA adapter (rank {tuning.rank}, {tuning.epochs} epochs)" if tuning.epochs \
        else "MiniLM embedding"
    manifest = {
        "model": f"sklearn LogisticRegression (class_weight=balanced) on [{embedding}, hashed word 1-2-gram "
                 f"TF-IDF, hashed character 3-5-gram TF-IDF ({HASH_FEATURES} columns each)] of the normalised text",
        "encoder_tuning": asdict(tuning),
        "C": best_c,
        "validation": f"{folds}-fold stratified out-of-fold predictions over the training sentences (adapter, idf "
                      "and regression all refitted per fold)",
        "validation_average_precision_by_C": {str(c): round(out_of_fold[c][0], 4) for c in c_grid},
        "seed": seed,
        "threshold_rules": {
            CRISIS: f"lowest threshold with <= {crisis_false_alarms:.1%} validation false alarms",
            CONCERN: f"lowest threshold with <= {concern_false_alarms:.1%} validation false alarms",
        },
        "validation_rates": {CRISIS: rates(probs, is_crisis, crisis_t), CONCERN: rates(probs, is_crisis, concern_t)},
    }
    return SafetyClassifier(model.coef_[0].astype(np.float32), float(model.intercept_[0]), lexical[0].idf,
                            lexical[1].idf, crisis_t, concern_t, manifest, lora_config, lora_weights)
