"""Response selection: rank candidate replies (generated or retrieved) against the dialogue so far.

The shipped selector is all-MiniLM-L6-v2 with a LoRA adapter trained with sentence-transformers'
MultipleNegativesRankingLoss on Empathetic Dialogues (dialogue so far, as `retriever.query_text` writes it ->
the listener reply; every other reply in the batch is a negative). Untuned MiniLM is trained for paraphrase
similarity, which favours replies that echo the message; the adapter moves both sides into a space where a
fitting reply lies close to its dialogue. At load the adapter is merged into a copy of the shared embedder
(ONNX Runtime on CPU, as the embedder). The vectors of the index's listener replies are embedded once per index
and selector and cached, so scoring a message embeds only the dialogue and its generated candidates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from chatbot.data import Example
from chatbot.embeddings import (
    EMBEDDER_NAME,
    Embedder,
    adapted_embedder,
    adapter_digest,
    embed,
    lora_arguments,
    read_head,
    save_head,
    trainable,
    with_lora,
)
from chatbot.retriever import QUERY_TURNS, RetrievedDialogue, Retriever
from chatbot.runtime import ASSETS_DIR, DEFAULT_SEED, cache_dir, set_seed

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

SELECTOR_DIR = ASSETS_DIR / "selector"
SELECTOR_VERSION = "ed-selector-v2"
SELECTOR_KIND = "minilm-lora"
WEIGHTS_FILE = "selector.npz"


class SelectorLoadError(ValueError):
    """The selector is missing, unreadable, or was trained for another embedder, context or format."""


@dataclass(frozen=True)
class SelectorTuning:
    """How train_selector.py fine-tunes MiniLM into the selector."""

    rank: int = 16  # LoRA rank on every linear layer: 0.7 M weights, 1.3 MB in float16 (the issue allows 5 MB)
    lr: float = 1e-3  # LoRA weights move little per step; full fine-tunes use about 5e-5
    batch_size: int = 64  # dialogues per step: every other reply in the batch is a negative
    scale: float = 20.0  # MultipleNegativesRankingLoss scale (1 / temperature), sentence-transformers' default
    # The learning rate falls linearly to 0 over the pass (sentence-transformers' default schedule): late steps
    # refine instead of jumping between checkpoints as they did at a constant rate.
    lr_decay: bool = True

    @property
    def lora(self) -> dict:
        """peft LoraConfig arguments of the adapter (also what the manifest records)."""
        return lora_arguments(self.rank)


class ResponseSelector:
    """Scores candidate replies to a dialogue by cosine in its encoder's space; higher is a better reply."""

    def __init__(self, encoder: Embedder, manifest: dict | None = None):
        """`encoder`: the embedder with the selector's adapter merged in (the plain embedder: untuned MiniLM)."""
        self.encoder = encoder
        self.manifest = manifest or {}
        self._index_vectors: tuple[str, np.ndarray] | None = None  # (cache key, the index replies' vectors)

    def score_vectors(self, context_vectors: np.ndarray, candidate_vectors: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Scores from this encoder's unit vectors: each context row against its own (candidates, dim) block."""
        return [cands @ ctx for ctx, cands in zip(context_vectors, candidate_vectors)]

    def score_many(self, contexts: Sequence[str], candidates: Sequence[Sequence[str]],
                   known: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Scores of each dialogue's candidates; every distinct text not in `known` is embedded once.

        `known`: candidate vectors already at hand by text (retrieved replies', see `known_replies`).
        """
        context_vectors, lookup = self.vectors(contexts, candidates, known)
        return self.score_vectors(context_vectors, [np.stack([lookup[c] for c in row]) for row in candidates])

    def vectors(self, contexts: Sequence[str], candidates: Sequence[Sequence[str]],
                known: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The dialogues' vectors and every candidate's by text; each distinct text not in `known` embedded once."""
        known = known or {}
        fresh = list(dict.fromkeys(c for row in candidates for c in row if c not in known))
        vectors = embed(self.encoder, [*contexts, *fresh])  # one call: per-call overhead is most of a message's cost
        return vectors[:len(contexts)], {**known, **dict(zip(fresh, vectors[len(contexts):]))}

    def score(self, context: str, candidates: Sequence[str], known: Mapping[str, np.ndarray] | None = None) -> list[float]:
        """Score each candidate as a reply to `context` (a dialogue as `query_text` writes it); see `score_many`."""
        if not candidates:
            return []
        return [float(s) for s in self.score_many([context], [candidates], known)[0]]

    def index_vectors(self, retriever: Retriever) -> np.ndarray:
        """This selector's vectors of every listener reply in `retriever`'s index: embedded once, then cached.

        The cache key names the index (its folder's manifest) and the selector's adapter, so a rebuilt index or a
        retrained selector gets fresh vectors.
        """
        key = hashlib.sha256(json.dumps([retriever.manifest, self.manifest.get("encoder_adapter")],
                                        sort_keys=True).encode()).hexdigest()[:16]
        if self._index_vectors is not None and self._index_vectors[0] == key:
            return self._index_vectors[1]
        path = cache_dir() / "selector" / f"replies-{key}.npy"
        if path.exists():
            vectors = np.load(path, mmap_mode="r")
        else:
            logger.info("Embedding the index's %d listener replies for the response selector (once)", len(retriever))
            vectors = embed(self.encoder, [r["response"] for r in retriever.records], batch_size=128, progress=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            tmp.replace(path)  # whole or absent: a crash never leaves a short file under the key
        self._index_vectors = (key, vectors)
        return vectors

    def known_replies(self, retriever: Retriever, hits: Sequence[RetrievedDialogue]) -> dict[str, np.ndarray]:
        """Retrieved listener replies by text, with this selector's cached vectors (hits from another index left out)."""
        vectors = self.index_vectors(retriever)
        return {hit.response: np.asarray(vectors[hit.row], dtype=np.float32) for hit in hits if hit.row >= 0}

    def save(self, out_dir: Path, lora: dict, weights: dict[str, np.ndarray], extra: dict | None = None) -> Path:
        """Write the adapter's weights (float16) and a manifest (format, kind, embedder, context turns, plus `extra`)."""
        stored = {name: value.astype(np.float16) for name, value in weights.items()}
        adapter = {"lora": lora, "sha256": adapter_digest(stored)}
        self.manifest = {**self.manifest, **(extra or {}), **_expected_manifest(), "encoder_adapter": adapter}
        return save_head(out_dir, WEIGHTS_FILE, stored, self.manifest)

    @classmethod
    def load(cls, path: Path, embedder: Embedder, embedder_name: str = EMBEDDER_NAME) -> ResponseSelector:
        """The saved adapter merged into a copy of `embedder`; SelectorLoadError says what is missing or does not fit."""
        manifest, weights = read_selector(path, embedder_name)
        adapter = manifest["encoder_adapter"]
        try:
            encoder = adapted_embedder(embedder, adapter["lora"], weights, adapter["sha256"])
        except ValueError as err:
            raise SelectorLoadError(f"Response selector {path} does not fit the embedder: {err}") from err
        return cls(encoder, manifest)


def read_selector(path: Path, embedder_name: str = EMBEDDER_NAME) -> tuple[dict, dict[str, np.ndarray]]:
    """A saved selector's manifest and float32 adapter weights, checked; SelectorLoadError says what does not fit."""
    try:
        manifest, weights = read_head(path, WEIGHTS_FILE)
        adapter = manifest["encoder_adapter"]
    except (OSError, ValueError, KeyError) as err:
        raise SelectorLoadError(f"Cannot read the response selector at {path}: {err}. "
                                "Train it: python train_selector.py") from err
    problems = [f"{key} {manifest.get(key)!r} != {value!r}" for key, value in _expected_manifest(embedder_name).items()
                if manifest.get(key) != value]
    if adapter_digest(weights) != adapter.get("sha256"):
        problems.append("the adapter's weights do not match the manifest's checksum")
    if problems:
        raise SelectorLoadError(f"Response selector {path} does not fit: {'; '.join(problems)}. "
                                "Retrain: python train_selector.py")
    return manifest, {name: value.astype(np.float32) for name, value in weights.items()}


def _expected_manifest(embedder_name: str = EMBEDDER_NAME) -> dict:
    """What a loader checks: same format, kind, embedder and dialogue context."""
    return {"format_version": SELECTOR_VERSION, "kind": SELECTOR_KIND, "embedder": embedder_name,
            "query_turns": QUERY_TURNS}


def load_response_selector(embedder: Embedder, path: Path = SELECTOR_DIR) -> ResponseSelector | None:
    """The shipped selector, or None (with a warning) when it is missing or does not fit."""
    try:
        return ResponseSelector.load(path, embedder)
    except SelectorLoadError as err:
        logger.warning("Response selection off: %s", err)
        return None


def tune_selector(embedder: Embedder, pairs: Sequence[tuple[str, str]], tuning: SelectorTuning,
                  seed: int = DEFAULT_SEED, evaluate: Callable[[SentenceTransformer], float] | None = None,
                  every: int = 0, progress: bool = True, initial: dict[str, np.ndarray] | None = None,
                  ) -> tuple[SentenceTransformer, dict[str, np.ndarray], list[dict]]:
    """Train a LoRA adapter on a copy of `embedder` over (dialogue, reply) pairs, one pass in seeded order.

    In-batch negatives with sentence-transformers' MultipleNegativesRankingLoss, both directions (each dialogue
    picks its reply among the batch's replies and each reply its dialogue). `initial`: adapter weights to start
    from (a saved selector's, for another pass) instead of peft's fresh LoRA. With `evaluate` (the encoder ->
    higher is better, e.g. P@1,N on valid) the model is scored before training and every `every` pairs, and the
    adapter of the best score is returned. Returns the tuned encoder (adapter not merged), the kept adapter's
    weights and a log.
    """
    import torch.nn.functional as F
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import batch_to_device
    from tqdm.auto import tqdm

    set_seed(seed)
    model = trainable(embedder)
    with_lora(model, tuning.lora, initial)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tuning.lr)
    starts = range(0, len(pairs), tuning.batch_size)  # one optimizer step per batch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(starts) if tuning.lr_decay else 1.0)
    loss_fn = MultipleNegativesRankingLoss(model, scale=tuning.scale)

    def state() -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model[0].auto_model).items()}

    def checkpoint(seen: int, loss: float | None) -> None:
        nonlocal best
        model.eval()
        entry = {"pairs": seen, "loss": loss, "lr": schedule.get_last_lr()[0], "valid": evaluate(model)}
        model.train()
        log.append(entry)
        logger.info("selector %s", entry)
        if best is None or entry["valid"] > best[0]:
            best = (entry["valid"], state())

    log: list[dict] = []
    best: tuple[float, dict] | None = None
    if evaluate is not None:
        checkpoint(0, None)
    order = np.random.default_rng(seed).permutation(len(pairs))
    losses, seen = [], 0
    model.train()
    for start in tqdm(starts, desc="Tuning the selector", disable=not progress):
        batch = [pairs[i] for i in order[start:start + tuning.batch_size]]
        # Dialogues and replies are padded apart: replies are short, one shared batch would pad them to dialogues.
        vectors = [F.normalize(model(batch_to_device(model.preprocess(list(side)), model.device))["sentence_embedding"], dim=-1)
                   for side in zip(*batch)]
        loss = loss_fn.compute_loss_from_embeddings(vectors, None)
        loss = (loss + loss_fn.compute_loss_from_embeddings(vectors[::-1], None)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        seen += len(batch)
        if evaluate is not None and every and (seen // every) > ((seen - len(batch)) // every):
            checkpoint(seen, float(np.mean(losses)))
            losses = []
    if evaluate is not None and (not log or log[-1]["pairs"] != seen):
        checkpoint(seen, float(np.mean(losses)) if losses else None)
    weights = best[1] if best is not None else state()
    if best is not None:
        set_peft_model_state_dict(model[0].auto_model, {k: torch.from_numpy(v) for k, v in weights.items()})
    return model.eval(), weights, log


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


def cross_encoder_trial(
    pairs: Sequence[tuple[str, str]], contexts: Sequence[str], candidates: Sequence[Sequence[str]],
    seconds: float, batch_size: int = 16, learning_rate: float = 2e-5, seed: int = DEFAULT_SEED,
) -> dict:
    """Fine-tune a sentence-transformers CrossEncoder from MiniLM for `seconds`, then rank like the selector.

    `pairs`: (context, reply); other replies in a batch are the negatives. Returns how many pairs it saw, its P@1
    on `candidates` (gold first) and the median ms to score one context against 10 candidates (the selector's
    added-latency budget).
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
