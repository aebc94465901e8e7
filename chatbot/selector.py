"""Response selection: rank candidate replies (generated or retrieved) against the dialogue so far.

The shipped selector is a bi-encoder on top of the shared all-MiniLM-L6-v2: two learned residual linear maps, one
for the dialogue (`retriever.query_text`, the text retrieval is keyed by) and one for the candidate reply, trained
with sentence-transformers' MultipleNegativesRankingLoss on Empathetic Dialogues (dialogue so far -> listener reply,
in-batch and mined hard negatives). MiniLM is trained for paraphrase similarity, which favours replies that echo
the message; the maps move both sides into a space where a fitting reply lies close to its dialogue.
Only the two matrices are stored; the encoder is the one the bot already loads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import trange

from chatbot.data import Example
from chatbot.embeddings import EMBEDDER_NAME, embed, read_head, save_head
from chatbot.retriever import QUERY_TURNS
from chatbot.runtime import ASSETS_DIR, DEFAULT_SEED

logger = logging.getLogger(__name__)

SELECTOR_DIR = ASSETS_DIR / "selector"
SELECTOR_VERSION = "ed-selector-v1"
SELECTOR_KIND = "minilm-residual-linear"
WEIGHTS_FILE = "selector.npz"


class SelectorLoadError(ValueError):
    """The selector is missing, unreadable, or was trained for another embedder, context or format."""


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ResponseSelector:
    """Scores candidate replies to a dialogue; higher is a better reply."""

    def __init__(self, embedder: SentenceTransformer, context_map: np.ndarray, reply_map: np.ndarray,
                 manifest: dict | None = None):
        """`context_map` / `reply_map`: (dim, dim) matrices applied to the embedder's unit vectors."""
        self.embedder = embedder
        self.context_map = np.asarray(context_map, dtype=np.float32)
        self.reply_map = np.asarray(reply_map, dtype=np.float32)
        self.manifest = manifest or {}

    def score_vectors(self, context_vectors: np.ndarray, candidate_vectors: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Scores from embeddings: each context row against its own (candidates, dim) block."""
        contexts = _normalise(context_vectors @ self.context_map.T)
        return [_normalise(cands @ self.reply_map.T) @ ctx for ctx, cands in zip(contexts, candidate_vectors)]

    def score_many(self, contexts: Sequence[str], candidates: Sequence[Sequence[str]],
                   known: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Scores of each dialogue's candidates; every distinct text not in `known` is embedded once.

        `known`: candidate vectors already at hand by text (retrieved replies' from the index).
        """
        known = known or {}
        fresh = list(dict.fromkeys(c for row in candidates for c in row if c not in known))
        vectors = embed(self.embedder, [*contexts, *fresh])  # one call: per-call overhead is most of a message's cost
        lookup = {**known, **dict(zip(fresh, vectors[len(contexts):]))}
        return self.score_vectors(vectors[:len(contexts)], [np.stack([lookup[c] for c in row]) for row in candidates])

    def score(self, context: str, candidates: Sequence[str], known: Mapping[str, np.ndarray] | None = None) -> list[float]:
        """Score each candidate as a reply to `context` (a dialogue as `query_text` writes it); see `score_many`."""
        if not candidates:
            return []
        return [float(s) for s in self.score_many([context], [candidates], known)[0]]

    def save(self, out_dir: Path, extra: dict | None = None) -> Path:
        """Write the two maps and a manifest (format, kind, embedder, context turns, plus `extra`)."""
        self.manifest = {**self.manifest, **(extra or {}), **_expected_manifest(self.context_map.shape[1])}
        # float16 halves the file; the maps are near identity plus small learned changes.
        arrays = {"context_map": self.context_map.astype(np.float16), "reply_map": self.reply_map.astype(np.float16)}
        return save_head(out_dir, WEIGHTS_FILE, arrays, self.manifest)

    @classmethod
    def load(cls, path: Path, embedder: SentenceTransformer, embedder_name: str = EMBEDDER_NAME) -> ResponseSelector:
        """Load saved maps for `embedder`; SelectorLoadError says clearly what is missing or does not fit."""
        try:
            manifest, weights = read_head(path, WEIGHTS_FILE)
            maps = weights["context_map"], weights["reply_map"]
        except (OSError, ValueError, KeyError) as err:
            raise SelectorLoadError(f"Cannot read the response selector at {path}: {err}. "
                                    "Train it: python train_selector.py") from err
        expected = _expected_manifest(embedder.get_embedding_dimension(), embedder_name)
        problems = [f"{key} {manifest.get(key)!r} != {value!r}" for key, value in expected.items()
                    if manifest.get(key) != value]
        if problems:
            raise SelectorLoadError(f"Response selector {path} does not fit: {'; '.join(problems)}. "
                                    "Retrain: python train_selector.py")
        return cls(embedder, *maps, manifest)


def _expected_manifest(dim: int, embedder_name: str = EMBEDDER_NAME) -> dict:
    """What a loader checks: same format, kind, embedder, embedding size and dialogue context."""
    return {"format_version": SELECTOR_VERSION, "kind": SELECTOR_KIND, "embedder": embedder_name, "dim": dim,
            "query_turns": QUERY_TURNS}


def load_response_selector(embedder: SentenceTransformer, path: Path = SELECTOR_DIR) -> ResponseSelector | None:
    """The shipped selector, or None (with a warning) when it is missing or does not fit."""
    try:
        return ResponseSelector.load(path, embedder)
    except SelectorLoadError as err:
        logger.warning("Response selection off: %s", err)
        return None


def candidate_sets(examples: Sequence[Example], pool: Sequence[Example], size: int, seed: int) -> list[list[str]]:
    """For each example: its gold reply, then `size - 1` replies drawn (seeded) from `pool`, never its own conversation.

    eval.py's P@1,N protocol.
    """
    rng = np.random.default_rng(seed)
    sets = []
    for ex in examples:
        others = [i for i, other in enumerate(pool) if other.conv_id != ex.conv_id]
        chosen = rng.choice(others, size=min(size - 1, len(others)), replace=False)
        sets.append([ex.reply, *(pool[i].reply for i in chosen)])
    return sets


def precision_at_1(scores: Sequence[np.ndarray], candidates: int | None = None) -> float:
    """Share of rows whose gold (first) candidate scores strictly highest among the first `candidates`, x100."""
    from chatbot.metrics import precision_at_1 as p_at_1

    width = min([len(s) for s in scores] + ([candidates] if candidates else []), default=0)
    return p_at_1(np.array([s[:width] for s in scores]))


def train_selector(
    embedder: SentenceTransformer,
    contexts: np.ndarray,
    replies: np.ndarray,
    negatives: np.ndarray | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    scale: float = 20.0,
    seed: int = DEFAULT_SEED,
    evaluate: Callable[[ResponseSelector], float] | None = None,
    progress: bool = True,
) -> tuple[ResponseSelector, list[dict]]:
    """Fit the two maps with MultipleNegativesRankingLoss over embedded (context, reply[, hard negative]) rows.

    Starts from the identity (the untuned embedder). With `evaluate` (higher = better, e.g. P@1,N on valid) the
    maps of the best epoch are kept: they overfit within a few epochs. Returns the selector and a per-epoch log.
    """
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    generator = torch.Generator().manual_seed(seed)
    dim = contexts.shape[1]
    maps = torch.nn.ParameterList([torch.nn.Parameter(torch.eye(dim)) for _ in range(2)])
    optimizer = torch.optim.AdamW(maps.parameters(), lr=learning_rate, weight_decay=0.0)
    loss_fn = MultipleNegativesRankingLoss(None, scale=scale)  # the model is only needed to embed texts
    columns = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (contexts, replies, negatives) if a is not None]

    def current() -> ResponseSelector:
        return ResponseSelector(embedder, *(m.detach().numpy().copy() for m in maps))

    log, best, best_maps = [], -math.inf, None
    for epoch in trange(epochs + 1, desc="selector", disable=not progress):
        losses = []
        if epoch:  # epoch 0 only measures the starting point
            for batch in torch.randperm(len(contexts), generator=generator).split(batch_size):
                rows = [c[batch] for c in columns]
                embedded = [rows[0] @ maps[0].T, *(r @ maps[1].T for r in rows[1:])]
                loss = loss_fn.compute_loss_from_embeddings(embedded, None)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        entry = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None}
        if evaluate is not None:
            entry["valid"] = evaluate(current())
            if entry["valid"] > best:
                best, best_maps = entry["valid"], current()
        log.append(entry)
        logger.info("selector epoch %s", entry)
    return best_maps or current(), log


def cross_encoder_trial(
    pairs: Sequence[tuple[str, str, str]], contexts: Sequence[str], candidates: Sequence[Sequence[str]],
    seconds: float, batch_size: int = 16, learning_rate: float = 2e-5, seed: int = DEFAULT_SEED,
) -> dict:
    """Fine-tune a sentence-transformers CrossEncoder from MiniLM for `seconds`, then rank like the selector.

    `pairs`: (context, reply, hard negative). Returns how many pairs it saw, its P@1 on `candidates` (gold first)
    and the median ms to score one context against 10 candidates (the selector's added-latency budget).
    """
    import time

    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

    from chatbot.embeddings import resolve_embedder

    torch.manual_seed(seed)
    model = CrossEncoder(resolve_embedder(), num_labels=1, max_length=128, device="cpu")
    loss_fn = MultipleNegativesRankingLoss(model, num_negatives=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order = np.random.default_rng(seed).permutation(len(pairs))
    deadline, seen = time.perf_counter() + seconds, 0
    model.train()
    while time.perf_counter() < deadline and seen < len(order):
        batch = [pairs[i] for i in order[seen:seen + batch_size]]
        loss = loss_fn([list(column) for column in zip(*batch)], None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(batch)
    model.eval()
    scores = [model.predict([(ctx, c) for c in row]) for ctx, row in zip(contexts, candidates)]
    times = []
    for ctx, row in list(zip(contexts, candidates))[:30]:
        started = time.perf_counter()
        model.predict([(ctx, c) for c in row[:10]])
        times.append(1000 * (time.perf_counter() - started))
    return {"pairs_seen": seen, "seconds": seconds, "p_at_1": round(precision_at_1(scores), 2),
            "ms_per_10_candidates": round(float(np.median(times)), 1)}
