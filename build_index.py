"""Build the retrieval index: embed train-split dialogues with MiniLM and write a FAISS index with a manifest."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chatbot.data import DataError
from chatbot.retriever import INDEX_TYPES, IndexLoadError, build_from_data
from chatbot.runtime import DEFAULT_SEED, default_index_dir, set_seed

logger = logging.getLogger("build_index")


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=None,
                        help="folder with train/valid/test.csv or the release .tar.gz (default: $ED_DATA_DIR, "
                             "then data/empatheticdialogues/, then download)")
    parser.add_argument("--index-dir", default=None,
                        help="where to write the index (default: $ED_INDEX_DIR or data/index/)")
    parser.add_argument("--split", default="train", choices=["train", "valid", "test"],
                        help="which split's listener replies to index (the app and training use train)")
    parser.add_argument("--index-type", default="flat", choices=INDEX_TYPES,
                        help="flat = exact search; ivf/hnsw = approximate (recall@10 against flat is logged)")
    parser.add_argument("--limit", type=count(0), default=0, help="index only a seeded random subset of N replies (0 = all)")
    parser.add_argument("--batch-size", type=count(1), default=128, help="embedding batch size")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for --limit sampling")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when an index already exists there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the index and print its manifest."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    index_dir = Path(args.index_dir) if args.index_dir else default_index_dir()
    if args.if_missing and (index_dir / "manifest.json").exists():
        logger.info("Index already at %s; nothing to do", index_dir)
        return 0
    started = time.perf_counter()
    try:  # the data is read before the embedder loads, so bad data fails fast; the old index stays untouched
        manifest = build_from_data(args.data_dir, index_dir, None, args.split, args.index_type,
                                   args.limit or None, args.seed, args.batch_size)
    except (DataError, IndexLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the index to {index_dir}: {err}", file=sys.stderr)
        return 2
    logger.info("Done in %.1fs: %d dialogues, %s", time.perf_counter() - started, manifest["count"], index_dir)
    print(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
