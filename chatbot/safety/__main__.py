"""`python -m chatbot.safety`: the crisis screen's held-out figures and its cost per message."""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from chatbot.embeddings import load_embedder
from chatbot.safety.classifier import HELDOUT_SETS, TRAIN_SENTENCES, load_sentences
from chatbot.safety.screen import CrisisScreen, score_screen


def main(argv: list[str] | None = None) -> int:
    """Score the frozen held-out sets, then time the screen on every held-out and training sentence."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each message is screened for the timing (default: 3; the median is reported)")
    parser.add_argument("--messages", type=int, default=None,
                        help="time only the first N messages (default: every held-out and training sentence)")
    parser.add_argument("--device", default=None, help="embedder device (default: $ED_DEVICE, else CUDA if present, else CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    screen = CrisisScreen(load_embedder(device=args.device))
    heldout = []
    for path in HELDOUT_SETS:
        sentences = load_sentences(path)
        scores = score_screen(screen, [s.text for s in sentences], [s.is_crisis for s in sentences])
        print(f"held-out ({path.name}): {scores.summary()}")
        heldout += sentences
    messages = [s.text for s in heldout + load_sentences(TRAIN_SENTENCES)][: args.messages]
    for text in messages[:20]:  # warm-up
        screen.check(text)
    times = []
    for text in messages * args.repeats:
        started = time.perf_counter()
        screen.check(text)
        times.append(time.perf_counter() - started)
    times.sort()
    print(f"screen cost per message over {len(times)} checks of {len(messages)} messages: median "
          f"{statistics.median(times) * 1000:.1f} ms, p95 {times[int(0.95 * len(times))] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
