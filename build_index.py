"""Build the retrieval index: embed train-split dialogues with MiniLM and write a FAISS index with a manifest."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chatbot import options
from chatbot.data import DataError
from chatbot.retriever import INDEX_FORMAT_VERSION, INDEX_TYPES, IndexLoadError, build_from_data, read_manifest
from chatbot.runtime import DEFAULT_SEED, default_index_dir, set_seed

logger = logging.getLogger("build_index")


@dataclass
class IndexArguments:
    """Which replies to index, how, and where."""

    data_dir: str | None = options.data_dir_option()
    index_dir: str | None = options.index_dir_option()
    split: str = options.option("train", "which split's listener replies to index (the app and training use train)",
                                choices=["train", "valid", "test"])
    index_type: str = options.option("flat", "flat = exact search; ivf/hnsw = approximate (recall@10 against flat "
                                             "is logged)", choices=INDEX_TYPES)
    limit: int = options.option(0, "index only a seeded random subset of N replies (0 = all)")
    batch_size: int = options.option(128, "embedding batch size")
    seed: int = options.option(DEFAULT_SEED, "seed for --limit sampling")
    if_missing: bool = options.option(False, "do nothing when an index of this format version already exists there "
                                             "(an older one is rebuilt)")

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers before anything is read."""
        options.at_least(self, 0, "limit")
        options.at_least(self, 1, "batch_size")


def main(argv: list[str] | None = None) -> int:
    """Build the index and print its manifest."""
    (args,) = options.Parser(IndexArguments, description=__doc__).parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    index_dir = Path(args.index_dir) if args.index_dir else default_index_dir()
    if args.if_missing and (index_dir / "manifest.json").exists():
        try:
            current = read_manifest(index_dir).get("format_version") == INDEX_FORMAT_VERSION
        except IndexLoadError:
            current = False
        if current:
            logger.info("Index already at %s; nothing to do", index_dir)
            return 0
        logger.info("The index at %s is of another format; rebuilding it", index_dir)
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
