"""Train the emotion detector (assets/emotion/): pick the mix on valid, report test accuracy once.

`python train_emotion.py` fits a logistic regression on the MiniLM embeddings the retrieval index already holds
(every train listener turn's context, labelled with its conversation's emotion) and one on hashed word n-grams of
the speaker's own words (first turns, situations, all speaker turns), chooses their mix on the valid split's first
turns and measures accuracy on the test split's first speaker turns (32 labels).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from chatbot.data import DataError, data_checksum, load_conversations
from chatbot.embeddings import embed_cached, load_embedder
from chatbot.emotion import EMOTION_DIR, speaker_text, train_detector
from chatbot.retriever import IndexLoadError, Retriever
from chatbot.runtime import DEFAULT_SEED, default_index_dir, set_seed

WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 1.0)  # share of the semantic classifier tried on valid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (every one documented in --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with train/valid/test.csv (default: $ED_DATA_DIR, data/)")
    p.add_argument("--index-dir", default=None,
                   help="train-split retrieval index whose stored vectors train the semantic part "
                        "(default: $ED_INDEX_DIR or data/index/)")
    p.add_argument("--out", default=str(EMOTION_DIR), help="folder to write classifier.npz and manifest.json")
    p.add_argument("--dense-c", type=float, default=1.0, help="inverse L2 strength of the semantic classifier")
    p.add_argument("--lexical-c", type=float, default=2.0, help="inverse L2 strength of the lexical classifier")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the solvers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, choose the mix on valid, measure test, save."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    started = time.perf_counter()
    embedder = load_embedder()
    try:
        train = [c for c in load_conversations(args.data_dir, "train") if c.emotion]
        valid = [c for c in load_conversations(args.data_dir, "valid") if c.emotion]
        test = [c for c in load_conversations(args.data_dir, "test") if c.emotion]
        retriever = Retriever(Path(args.index_dir) if args.index_dir else default_index_dir(), embedder)
        checksum = data_checksum(args.data_dir, ["train"])
    except (DataError, IndexLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The index already holds an embedding of every train listener turn's context: no second embedding pass.
    vectors = retriever.index.reconstruct_n(0, retriever.index.ntotal)
    dense_labels = [r["emotion"] for r in retriever.records]
    labels = [c.emotion for c in train]
    lexical_texts = ([c.turns[0].text for c in train] + [c.situation for c in train]
                     + [speaker_text(c.turns) for c in train])
    detector = train_detector(embedder, vectors, dense_labels, lexical_texts, labels * 3,
                              dense_c=args.dense_c, lexical_c=args.lexical_c, seed=args.seed)

    def first_turn_accuracy(conversations: list, name: str) -> float:
        texts = [c.turns[0].text for c in conversations]
        probs = detector.probabilities(texts, embed_cached(embedder, texts, name))
        return float(np.mean([detector.labels[i] == c.emotion for i, c in zip(probs.argmax(axis=1), conversations)]))

    # The mix is chosen on valid only; test is measured once, after.
    scores = {}
    for weight in WEIGHTS:
        detector.weight = weight
        scores[weight] = first_turn_accuracy(valid, "valid-first")
    detector.weight = max(scores, key=scores.get)
    acc = first_turn_accuracy(test, "test-first")
    detector.save(Path(args.out), {
        "arguments": vars(args),
        "valid_accuracy_by_weight": scores,
        "test_accuracy_first_turn": round(acc, 4),
        "protocol": "test split, first speaker turn -> gold conversation emotion, 32 labels; mix weight chosen on "
                    "the valid split's first speaker turns",
        "test_conversations": len(test),
        "data_checksum_train": checksum,
        "train_seconds": round(time.perf_counter() - started, 1),
    })
    print(f"emotion accuracy (test, first speaker turn, {len(test)} conversations): {acc:.1%} "
          f"(semantic weight {detector.weight}, valid {scores[detector.weight]:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
