"""Train the response selector (assets/selector/) on Empathetic Dialogues and measure P@1,N on the test split.

`python train_selector.py` fine-tunes a LoRA adapter on all-MiniLM-L6-v2 over the train split's
(dialogue so far -> listener reply) pairs with in-batch negatives (sentence-transformers'
MultipleNegativesRankingLoss, both directions), one pass in seeded order, scoring P@1,N on valid dialogues every
`--eval-every` pairs and keeping the best adapter. It then reloads the saved selector as the bot does (adapter
merged, ONNX Runtime) and reports P@1,100 / P@1,10 of the untuned MiniLM and of the selector on the test split
(eval.py's protocol). On the 2-core CPU, about 16 pairs a second: the whole train split is about an hour here;
`--pairs` sizes a shorter run (see README).

    python train_selector.py --data-dir ../shared/data/empatheticdialogues   # the shipped run: every train pair
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from chatbot.data import DataError, Example, data_checksum, examples_of, load_conversations, sample
from chatbot.embeddings import load_embedder
from chatbot.retriever import IndexLoadError, Retriever, query_text
from chatbot.runtime import DEFAULT_SEED, default_index_dir, set_seed
from chatbot.selector import (
    SELECTOR_DIR,
    ResponseSelector,
    SelectorLoadError,
    SelectorTuning,
    candidate_sets,
    cross_encoder_trial,
    precision_at_1,
    read_selector,
    tune_selector,
)

logger = logging.getLogger("train_selector")
POOL = 1000  # replies the distractors are drawn from (eval.py's CANDIDATE_POOL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (every one documented in --help)."""
    defaults = SelectorTuning()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with train/valid/test.csv (default: $ED_DATA_DIR, data/)")
    p.add_argument("--index-dir", default=None, help="train-split retrieval index (default: $ED_INDEX_DIR or data/index/)")
    p.add_argument("--out", default=str(SELECTOR_DIR), help="folder to write selector.npz and manifest.json")
    p.add_argument("--pairs", type=int, default=0, help="train on a seeded random subset of N dialogues (0 = all)")
    p.add_argument("--init", default=None,
                   help="a saved selector folder whose adapter is the starting point (another pass; same --rank)")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank on every linear layer of MiniLM")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="dialogues per step (every other reply in the batch is a negative)")
    p.add_argument("--scale", type=float, default=defaults.scale, help="MultipleNegativesRankingLoss scale (1 / temperature)")
    p.add_argument("--no-lr-decay", dest="lr_decay", action="store_false",
                   help="keep the learning rate constant (default: falls linearly to 0 over the pass)")
    p.add_argument("--eval-every", type=int, default=4096, help="score P@1,N on valid every N training pairs")
    p.add_argument("--candidates", type=int, default=100, help="N of P@1,N (P@1,10 is also reported)")
    p.add_argument("--valid-examples", type=int, default=500, help="valid dialogues that choose the best checkpoint")
    p.add_argument("--test-examples", type=int, nargs="+", default=[200, 2000],
                   help="test sample sizes to report (200 = eval.py's default sample)")
    p.add_argument("--cross-encoder-seconds", type=float, default=0,
                   help="also fine-tune a CrossEncoder for this long and compare it with the selector on "
                        "--cross-encoder-dialogues valid dialogues (P@1,10 and latency; 0 = skip)")
    p.add_argument("--cross-encoder-dialogues", type=int, default=200, help="valid dialogues for that comparison")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for sampling, batches, distractors")
    return p.parse_args(argv)


def ranking_task(examples: list[Example], pool_examples: list[Example], size: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Dialogue texts and, per dialogue, its candidate replies (gold first): eval.py's protocol."""
    return [query_text(ex.history) for ex in examples], candidate_sets(examples, sample(pool_examples, POOL, seed + 1), size, seed)


def latency_ms(selector: ResponseSelector, examples: list[Example], candidates: int = 10, calls: int = 30) -> float:
    """Median wall time of one `score` call: a test dialogue against `candidates` test replies, all embedded."""
    replies = [ex.reply for ex in examples]
    times = []
    for n, ex in enumerate(examples[:calls]):
        started = time.perf_counter()
        selector.score(query_text(ex.history), replies[n + 1:n + 1 + candidates])
        times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 1)


def compare_cross_encoder(args: argparse.Namespace, pairs: list[tuple[str, str]], valid: list[Example],
                          selector: ResponseSelector) -> dict:
    """P@1,10 and latency of a briefly trained CrossEncoder next to the selector's, on the same valid dialogues."""
    examples = sample(valid, args.cross_encoder_dialogues, args.seed)
    contexts, sets = ranking_task(examples, valid, 10, args.seed)
    trial = cross_encoder_trial(pairs, contexts, sets, args.cross_encoder_seconds, seed=args.seed)
    return {"cross_encoder": trial, "selector": {"p_at_1": round(precision_at_1(selector.score_many(contexts, sets)), 2),
                                                  "ms_per_10_candidates": latency_ms(selector, examples)},
            "protocol": f"P@1,10 on {len(examples)} valid dialogues (gold + 9 valid replies of other conversations)"}


def main(argv: list[str] | None = None) -> int:
    """Train, keep the best checkpoint on valid, save, reload, test."""
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
        tuning = SelectorTuning(rank=args.rank, lr=args.lr, batch_size=args.batch_size, scale=args.scale,
                                lr_decay=args.lr_decay)
        init_manifest, initial = read_selector(Path(args.init)) if args.init else ({}, None)
        if initial is not None and init_manifest["encoder_adapter"]["lora"] != tuning.lora:
            raise SelectorLoadError(f"--init {args.init} is a {init_manifest['encoder_adapter']['lora']} adapter, "
                                    f"not {tuning.lora}: give the same --rank")
    except (DataError, IndexLoadError, SelectorLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pairs = [(query_text(ex.history), ex.reply) for ex in train]
    valid_contexts, valid_sets = ranking_task(sample(valid, args.valid_examples, args.seed), valid, args.candidates, args.seed)
    _, weights, log = tune_selector(
        embedder, pairs, tuning, args.seed, every=args.eval_every, initial=initial,
        evaluate=lambda model: round(precision_at_1(ResponseSelector(model).score_many(valid_contexts, valid_sets)), 2))
    metrics: dict = {"valid_p_at_1_by_checkpoint": log}
    extra = {"arguments": vars(args), "tuning": asdict(tuning), "train_dialogues": len(train),
             **({"initial_adapter": {k: init_manifest.get(k) for k in ("trained_at", "tuning", "encoder_adapter")}}
                if initial is not None else {}),
             "data_checksum_train": checksum, "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    ResponseSelector(embedder).save(out, tuning.lora, weights, {**extra, "metrics": metrics})
    selector = ResponseSelector.load(out, embedder)  # what the bot serves: adapter merged, on ONNX Runtime
    untuned = ResponseSelector(embedder)

    if args.cross_encoder_seconds > 0:
        metrics["cross_encoder_trial"] = compare_cross_encoder(args, pairs, valid, selector)
    for size in args.test_examples:
        contexts, sets = ranking_task(sample(test, size, args.seed), test, args.candidates, args.seed)
        report, nearest = {}, None
        for label, model in (("untuned_minilm", untuned), ("selector", selector)):
            context_vectors, lookup = model.vectors(contexts, sets)
            if nearest is None:  # the index is keyed by untuned MiniLM's vectors
                # What the bot weighs: the gold reply against the replies of the 9 train dialogues nearest to it.
                _, nearest = retriever.index.search(context_vectors, min(9, retriever.index.ntotal))
            scores = model.score_vectors(context_vectors, [np.stack([lookup[c] for c in row]) for row in sets])
            neighbours = model.index_vectors(retriever)  # embedded once per index and encoder, then cached
            retrieved = model.score_vectors(context_vectors, [np.vstack([lookup[row[0]][None], neighbours[ids]])
                                                              for row, ids in zip(sets, nearest)])
            report[label] = {f"p_at_1_{args.candidates}": round(precision_at_1(scores), 2),
                             "p_at_1_10": round(precision_at_1(scores, 10), 2),
                             "p_at_1_10_retrieved": round(precision_at_1(retrieved), 2)}
        metrics[f"test_{size}"] = report
        print(f"test, {size} dialogues: {json.dumps(report)}")
    metrics["ms_per_10_candidates"] = latency_ms(selector, sample(test, 40, args.seed))
    metrics["protocol"] = (
        f"P@1,N on the official test split: a seeded sample (seed {args.seed}) of listener replies; each dialogue "
        f"(query_text: its last turns) ranks its gold reply against N-1 replies drawn (seeded) from {POOL} other "
        "test replies of other conversations (eval.py's protocol); a hit when the gold scores strictly highest. "
        "P@1,10 = the gold and the first 9 of those distractors; P@1,10 retrieved = the gold against the replies of "
        "the 9 train dialogues nearest to it in the retrieval index (what the bot weighs). The checkpoint is chosen by "
        f"P@1,N on {args.valid_examples} valid dialogues (same protocol on the valid split). Latency: median of 30 "
        "`score` calls (one dialogue, 10 replies, all embedded) on this machine's CPU.")
    extra["train_seconds"] = round(time.perf_counter() - started, 1)
    ResponseSelector(embedder).save(out, tuning.lora, weights, {**extra, "metrics": metrics})
    print(f"saved {args.out} ({metrics['ms_per_10_candidates']} ms per 10 candidates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
