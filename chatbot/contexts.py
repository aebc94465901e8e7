"""Retrieved neighbours and detected emotion for data-set examples, exactly as the chatbot adds them at inference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from chatbot.data import Example
from chatbot.embeddings import Embedder, embed
from chatbot.emotion import EmotionDetector
from chatbot.retriever import RetrievedDialogue, Retriever, query_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleContext:
    """What the prompt of one example carries besides the dialogue."""

    references: list[RetrievedDialogue] = field(default_factory=list)
    emotion: str | None = None


def example_vectors(
    examples: Sequence[Example], texts: Sequence[str], embedder: Embedder, retriever: Retriever | None
) -> np.ndarray:
    """Embeddings of the examples' query texts; train examples reuse the index's stored vectors."""
    stored = retriever.stored_vectors(examples) if retriever is not None else [None] * len(examples)
    missing = [i for i, vec in enumerate(stored) if vec is None]
    logger.info("Query vectors: %d from the index, %d to embed", len(examples) - len(missing), len(missing))
    fresh = embed(embedder, [texts[i] for i in missing], batch_size=128, progress=len(missing) > 1000) if missing else []
    for i, vec in zip(missing, fresh):
        stored[i] = vec
    return np.stack(stored).astype(np.float32) if stored else np.zeros((0, 0), np.float32)


def example_contexts(
    examples: Sequence[Example],
    embedder: Embedder,
    retriever: Retriever | None,
    emotion: EmotionDetector | None,
    k: int,
    vectors: np.ndarray | None = None,
) -> list[ExampleContext]:
    """Top-k neighbours (never from the example's own conversation) and detected emotion for each example.

    `vectors`: the examples' query embeddings when the caller already has them (else they are looked up or embedded).
    """
    if not examples or (retriever is None and emotion is None):
        return [ExampleContext() for _ in examples]
    texts = [query_text(ex.history) for ex in examples]
    if vectors is None:
        vectors = example_vectors(examples, texts, embedder, retriever)
    emotions = emotion.predict_batch(texts, vectors) if emotion else [None] * len(examples)
    references = (
        retriever.search_vectors(vectors, k, [[ex.conv_id] for ex in examples]) if retriever else [[]] * len(examples)
    )
    return [ExampleContext(refs, e.label if e else None) for refs, e in zip(references, emotions)]
