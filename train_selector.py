"""Train the response selector (assets/selector/) on Empathetic Dialogues and measure P@1,N on the test split.

`python train_selector.py` takes each train dialogue's and each listener reply's embedding from the retrieval
index (format v2 stores both), mines one hard negative per dialogue (the reply of a similar
dialogue from another conversation, via the index), fits the selector with MultipleNegativesRankingLoss, keeps the
epoch that ranks best on the valid split, and reports P@1,100 / P@1,10 of the untuned MiniLM and of the selector
on the test split (eval.py's protocol).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from chatbot.data import DataError, Example, data_checksum, examples_of, load_conversations, sample
from chatbot.embeddings import embed_cached, load_embedder
from chatbot.retriever import IndexLoadError, Retriever, query_text
from chatbot.runtime import DEFAULT_SEED, default_index_dir, set_seed
from chatbot.selector import (
    SELECTOR_DIR,
    ResponseSelector,
    candidate_sets,
    cross_encoder_trial,
    precision_at_1,
    train_selector,
)

logger = logging.getLogger("train_selector")
POOL = 1000  # replies the distractors are drawn from (eval.py's CANDIDATE_POOL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (every one documented in --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with train/valid/test.csv (default: $ED_DATA_DIR, data/)")
    p.add_argument("--index-dir", default=None, help="train-split retrieval index (default: $ED_INDEX_DIR or data/index/)")
    p.add_argument("--out", default=str(SELECTOR_DIR), help="folder to write selector.npz and manifest.json")
    p.add_argument("--pairs", type=int, default=0, help="train on a seeded random subset of N dialogues (0 = all)")
    p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="add one mined hard negative per dialogue to the in-batch negatives")
    p.add_argument("--negative-ranks", type=int, nargs=2, default=(20, 50), metavar=("FROM", "TO"),
                   help="the hard negative is the reply of a random neighbour ranked FROM..TO-1 (0 = nearest) among "
                        "other conversations; the nearest are skipped because their replies often fit too "
                        "(on valid, ranks 3..9 ranked worse than 20..49)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training dialogues (the best on valid is kept)")
    p.add_argument("--batch-size", type=int, default=256, help="dialogues per step (all others' replies are negatives)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--scale", type=float, default=20.0, help="MultipleNegativesRankingLoss scale (1 / temperature)")
    p.add_argument("--candidates", type=int, default=100, help="N of P@1,N (P@1,10 is also reported)")
    p.add_argument("--valid-examples", type=int, default=1000, help="valid dialogues that choose the best epoch")
    p.add_argument("--test-examples", type=int, nargs="+", default=[200, 2000],
                   help="test sample sizes to report (200 = eval.py's default sample)")
    p.add_argument("--cross-encoder-seconds", type=float, default=0,
                   help="also fine-tune a CrossEncoder for this long and compare it with the selector on "
                        "--cross-encoder-dialogues valid dialogues (P@1,10 and latency; 0 = skip)")
    p.add_argument("--cross-encoder-dialogues", type=int, default=200, help="valid dialogues for that comparison")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for sampling, negatives, batches, distractors")
    args = p.parse_args(argv)
    if args.negative_ranks[0] >= args.negative_ranks[1]:
        p.error("--negative-ranks FROM must be below TO")
    return args


def ranking_task(embedder, examples: list[Example], pool_examples: list[Example], size: int, seed: int,
                 name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Context vectors and, per example, the vectors of its candidates (gold first), eval.py's protocol."""
    sets = candidate_sets(examples, sample(pool_examples, POOL, seed + 1), size, seed)
    replies = list(dict.fromkeys(c for row in sets for c in row))
    reply_vectors = embed_cached(embedder, replies, f"{name}-replies")
    position = {text: i for i, text in enumerate(replies)}
    contexts = embed_cached(embedder, [query_text(ex.history) for ex in examples], f"{name}-contexts")
    return contexts, [reply_vectors[[position[c] for c in row]] for row in sets]


def hard_negatives(retriever: Retriever, vectors: np.ndarray, examples: list[Example], ranks: tuple[int, int],
                   seed: int) -> list[int]:
    """Index position of one neighbour per example, drawn from ranks FROM..TO-1 among other conversations."""
    rng = np.random.default_rng(seed)
    position = {(r["conv_id"], r["context"], r["response"]): i for i, r in enumerate(retriever.records)}
    hits = retriever.search_vectors(vectors, ranks[1], [[ex.conv_id] for ex in examples])
    chosen = []
    for row in hits:
        hit = row[rng.integers(ranks[0], len(row))] if len(row) > ranks[0] else row[-1]
        chosen.append(position[(hit.conv_id, hit.context, hit.response)])
    return chosen


def latency_ms(selector: ResponseSelector, examples: list[Example], candidates: int = 10, calls: int = 30) -> float:
    """Median wall time of one `score` call: a test dialogue against `candidates` test replies."""
    replies = [ex.reply for ex in examples]
    times = []
    for n, ex in enumerate(examples[:calls]):
        started = time.perf_counter()
        selector.score(query_text(ex.history), replies[n + 1:n + 1 + candidates])
        times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 1)


def compare_cross_encoder(args: argparse.Namespace, pairs: list[tuple[str, str, str]], valid: list[Example],
                          selector: ResponseSelector) -> dict:
    """P@1,10 and latency of a briefly trained CrossEncoder next to the selector's, on the same valid dialogues."""
    examples = sample(valid, args.cross_encoder_dialogues, args.seed)
    sets = [row[:10] for row in candidate_sets(examples, sample(valid, POOL, args.seed + 1), 10, args.seed)]
    contexts = [query_text(ex.history) for ex in examples]
    trial = cross_encoder_trial(pairs, contexts, sets, args.cross_encoder_seconds, seed=args.seed)
    return {"cross_encoder": trial, "selector": {"p_at_1": round(precision_at_1(selector.score_many(contexts, sets)), 2),
                                                  "ms_per_10_candidates": latency_ms(selector, examples)},
            "protocol": f"P@1,10 on {len(examples)} valid dialogues (gold + 9 valid replies of other conversations)"}


def main(argv: list[str] | None = None) -> int:
    """Train, select on valid, test, save."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    started = time.perf_counter()
    embedder = load_embedder()
    try:
        retriever = Retriever(Path(args.index_dir) if args.index_dir else default_index_dir(), embedder)
        train = sample(examples_of(load_conversations(args.data_dir, "train")), args.pairs, args.seed)
        valid = examples_of(load_conversations(args.data_dir, "valid"))
        test = examples_of(load_conversations(args.data_dir, "test"))
        checksum = data_checksum(args.data_dir, ["train"])
    except (DataError, IndexLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stored = retriever.stored_vectors(train)
    missing = [i for i, v in enumerate(stored) if v is None]
    if missing:
        print(f"error: {len(missing)} train dialogues are not in the index {retriever.index_dir} "
              "(built from other data?); rebuild it: python build_index.py", file=sys.stderr)
        return 2
    contexts = np.stack(stored)
    # Every index reply's stored vector (not only the sampled ones): hard negatives may come from any of them.
    all_replies = retriever.reply_vectors(range(len(retriever)))
    positions = {(r["conv_id"], r["context"], r["response"]): i for i, r in enumerate(retriever.records)}
    replies = all_replies[[positions[(ex.conv_id, query_text(ex.history), ex.reply)] for ex in train]]
    negatives_at = hard_negatives(retriever, contexts, train, tuple(args.negative_ranks), args.seed)
    negatives = all_replies[negatives_at] if args.hard_negatives else None

    valid_contexts, valid_candidates = ranking_task(
        embedder, sample(valid, args.valid_examples, args.seed), valid, args.candidates, args.seed, "valid")
    selector, log = train_selector(
        embedder, contexts, replies, negatives, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, scale=args.scale, seed=args.seed,
        evaluate=lambda s: precision_at_1(s.score_vectors(valid_contexts, valid_candidates)))
    untuned = ResponseSelector(embedder, *(np.eye(contexts.shape[1]),) * 2)

    metrics = {"valid_p_at_1_by_epoch": log}
    if args.cross_encoder_seconds > 0:
        pairs = [(query_text(ex.history), ex.reply, retriever.records[i]["response"])
                 for ex, i in zip(train, negatives_at)]
        metrics["cross_encoder_trial"] = compare_cross_encoder(args, pairs, valid, selector)
    for size in args.test_examples:
        test_contexts, test_candidates = ranking_task(
            embedder, sample(test, size, args.seed), test, args.candidates, args.seed, "test")
        # What the bot weighs: the gold reply against the replies of the 9 most similar train dialogues.
        _, nearest = retriever.index.search(test_contexts, min(9, retriever.index.ntotal))
        retrieved = [np.vstack([row[:1], all_replies[ids]]) for row, ids in zip(test_candidates, nearest)]
        for label, model in (("untuned_minilm", untuned), ("selector", selector)):
            scores = model.score_vectors(test_contexts, test_candidates)
            metrics[f"test_{size}"] = {**metrics.get(f"test_{size}", {}), label: {
                f"p_at_1_{args.candidates}": round(precision_at_1(scores), 2),
                "p_at_1_10": round(precision_at_1(scores, 10), 2),
                "p_at_1_10_retrieved": round(precision_at_1(model.score_vectors(test_contexts, retrieved)), 2)}}
        print(f"test, {size} dialogues: {json.dumps(metrics[f'test_{size}'])}")
    metrics["ms_per_10_candidates"] = latency_ms(selector, sample(test, 40, args.seed))
    metrics["protocol"] = (
        f"P@1,N on the official test split: a seeded sample (seed {args.seed}) of listener replies; each dialogue "
        f"(query_text: its last turns) ranks its gold reply against N-1 replies drawn (seeded) from {POOL} other "
        "test replies of other conversations (eval.py's protocol); a hit when the gold scores strictly highest. "
        "P@1,10 = the gold and the first 9 of those distractors; P@1,10 retrieved = the gold against the replies of "
        "the 9 train dialogues nearest to it in the retrieval index (what the bot weighs). The best epoch is chosen by P@1,N on "
        f"{args.valid_examples} valid dialogues (same protocol on the valid split). Latency: median of 30 "
        "`score` calls (one dialogue, 10 replies, embedding included) on this machine's CPU.")
    selector.save(Path(args.out), {
        "arguments": vars(args),
        "metrics": metrics,
        "train_dialogues": len(train),
        "data_checksum_train": checksum,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(time.perf_counter() - started, 1),
    })
    print(f"saved {args.out} ({metrics['ms_per_10_candidates']} ms per 10 candidates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
