"""Empathetic Dialogues statistics: counts per split and the emotion distribution figure (the report's Figure 1)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from chatbot import options
from chatbot.data import DataError, dataset_stats, plot_emotion_distribution
from chatbot.runtime import ASSETS_DIR


@dataclass
class StatsArguments:
    """Which data, and where the figure goes."""

    data_dir: str | None = options.data_dir_option()
    plot: str = options.option(str(ASSETS_DIR / "figures" / "emotion_distribution.png"),
                               "where to save the emotion distribution bar chart ('' to skip)")


def main(argv: list[str] | None = None) -> int:
    """Print the counts per split and save the emotion distribution figure."""
    (args,) = options.Parser(StatsArguments, description=__doc__).parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = dataset_stats(args.data_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats["splits"], indent=2))
    if args.plot:
        print(f"saved {plot_emotion_distribution(stats, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
