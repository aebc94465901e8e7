"""Train the crisis screen's classifier on the labelled sentences and write assets/safety/ with its manifest.

The classifier reads MiniLM with a LoRA adapter fine-tuned here (--encoder-epochs 0: the embedder as is) next to
word and character n-grams. The held-out sets (chatbot/safety/sentences/heldout*.jsonl) never train anything:
training refuses to start when a training sentence embeds within --max-overlap cosine of a held-out sentence, and
the held-out figures in the manifest are measured once, after the thresholds were chosen on the validation part of
the training set.

Usage: `python train_safety.py` (about 12 minutes on a 2-core CPU; --encoder-epochs 0 takes seconds).
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from chatbot.embeddings import EMBEDDER_NAME, EMBEDDER_PRECISION, embed, load_embedder
from chatbot.runtime import DEFAULT_SEED, files_sha256, set_seed
from chatbot.safety.classifier import (
    ARTIFACT_DIR,
    HELDOUT_SETS,
    TRAIN_SENTENCES,
    EncoderTuning,
    load_sentences,
    near_duplicates,
    train_classifier,
)
from chatbot.safety.screen import CrisisScreen, normalise, score_screen

logger = logging.getLogger("train_safety")
MAX_OVERLAP = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=Path, default=TRAIN_SENTENCES,
                        help="labelled training sentences, JSONL (default: chatbot/safety/sentences/train.jsonl)")
    parser.add_argument("--heldout", type=Path, nargs="+", default=list(HELDOUT_SETS),
                        help="the frozen held-out sets, JSONL: checked for overlap and scored once, never trained on "
                             "(default: chatbot/safety/sentences/heldout.jsonl and heldout-2.jsonl)")
    parser.add_argument("--out", type=Path, default=ARTIFACT_DIR,
                        help="folder to write classifier.npz and manifest.json (default: assets/safety)")
    parser.add_argument("--folds", type=int, default=5,
                        help="cross-validation folds whose out-of-fold predictions choose C and the thresholds "
                             "(default: 5)")
    parser.add_argument("--crisis-false-alarms", type=float, default=0.02,
                        help="the crisis threshold is the lowest with at most this share of validation false alarms "
                             "(default: 0.02)")
    parser.add_argument("--concern-false-alarms", type=float, default=0.05,
                        help="the concern threshold is the lowest with at most this share of validation false alarms "
                             "(default: 0.05, the issue's false-alarm target)")
    parser.add_argument("--c-grid", default="1,4,16,64",
                        help="comma-separated inverse regularisation strengths tried on validation (default: 1,4,16,64)")
    parser.add_argument("--encoder-epochs", type=int, default=EncoderTuning.epochs,
                        help=f"epochs of LoRA fine-tuning of the embedder for the screen, per fold and once on every "
                             f"sentence; 0 keeps the embedder frozen (default: {EncoderTuning.epochs})")
    parser.add_argument("--encoder-lr", type=float, default=EncoderTuning.lr,
                        help=f"learning rate of the embedder's LoRA weights (default: {EncoderTuning.lr})")
    parser.add_argument("--lora-r", type=int, default=EncoderTuning.rank,
                        help=f"rank of the embedder's LoRA adapter (default: {EncoderTuning.rank})")
    parser.add_argument("--max-overlap", type=float, default=MAX_OVERLAP,
                        help=f"refuse to train when a training sentence is this close (cosine) to a held-out one "
                             f"(default: {MAX_OVERLAP})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"split and solver seed (default: {DEFAULT_SEED})")
    parser.add_argument("--device", default=None, help="embedder device (default: $ED_DEVICE, else CUDA if present, else CPU)")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    try:
        args.c_grid = tuple(float(c) for c in args.c_grid.split(","))
    except ValueError:
        parser.error(f"--c-grid must be comma-separated numbers, not {args.c_grid!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Train, check, evaluate and save the crisis classifier."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    set_seed(args.seed)
    try:
        train, heldouts = load_sentences(args.train), [load_sentences(path) for path in args.heldout]
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    embedder = load_embedder(device=args.device)
    vectors = embed(embedder, [normalise(s.text) for s in train], progress=True)
    closest = []
    for heldout in heldouts:
        heldout_vectors = embed(embedder, [normalise(s.text) for s in heldout])
        overlap = near_duplicates(vectors, heldout_vectors, args.max_overlap)
        if overlap:
            pairs = "\n".join(f"  {cos:.3f}: {train[i].text!r} ~ {heldout[j].text!r}" for i, j, cos in overlap)
            raise SystemExit(f"error: training sentences too close to held-out ones (rewrite them):\n{pairs}")
        closest.append(round(float((vectors @ heldout_vectors.T).max()), 4))
    is_crisis = np.array([s.is_crisis for s in train])
    tuning = EncoderTuning(args.encoder_epochs, args.encoder_lr, args.lora_r)
    classifier = train_classifier([normalise(s.text) for s in train], is_crisis, embedder, tuning, args.c_grid,
                                  args.folds, args.crisis_false_alarms, args.concern_false_alarms, args.seed)
    screen = CrisisScreen(embedder, classifier)
    scores = [score_screen(screen, [s.text for s in heldout], [s.is_crisis for s in heldout]) for heldout in heldouts]
    classifier.manifest.update({
        "version": 1,
        "embedder": EMBEDDER_NAME,
        "embedder_precision": EMBEDDER_PRECISION,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_sentences": {"path": "chatbot/safety/sentences/train.jsonl", "sha256": files_sha256([args.train]),
                            "crisis": int(is_crisis.sum()), "safe": int((~is_crisis).sum())},
        "heldout": [{"path": path.name, "sha256": files_sha256([path]), "max_training_overlap_cosine": cosine,
                     "screen": score.to_dict()} for path, cosine, score in zip(args.heldout, closest, scores)],
        "train_seconds": round(time.perf_counter() - started, 1),
    })
    classifier.save(args.out)
    print(f"thresholds: crisis >= {classifier.crisis_threshold:.3f}, concern >= {classifier.concern_threshold:.3f} "
          f"(C={classifier.manifest['C']}); validation: {classifier.manifest['validation_rates']}")
    for path, score in zip(args.heldout, scores):
        print(f"held-out {path.name}, whole screen: {score.summary()}")
        for line in score.missed:
            print(f"  missed: {line}")
        for line in score.flagged:
            print(f"  flagged: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
