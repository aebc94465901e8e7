"""`python -m chatbot.bench`: measure retrieval query latency and reply latency on this machine."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np

from chatbot.data import SPEAKER, Turn, load_examples
from chatbot.generation import PRESETS

REPORT_MESSAGE = "I had such a hard day at work today. Things keep piling up."


def percentiles(samples: list[float]) -> dict[str, float]:
    """Median and p95 of timings, in milliseconds."""
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "n": len(samples)}


def bench_retrieval(bot, data_dir: str | None, queries: int) -> dict:
    """Embed + search (k=5) latency over held-out test messages, after a warm-up."""
    messages = [ex.history[-1].text for ex in load_examples(data_dir, "test", limit=queries + 5)]
    for message in messages[:5]:
        bot.retriever.search([Turn(SPEAKER, message)], k=5)
    timings = []
    for message in messages[5:]:
        started = time.perf_counter()
        bot.retriever.search([Turn(SPEAKER, message)], k=5)
        timings.append(time.perf_counter() - started)
    return {"index_count": len(bot.retriever), **percentiles(timings)}


def bench_reply(bot, runs: int, use_retrieval: bool) -> dict:
    """Time to first token, decode speed and full reply latency for the report's message, greedy."""
    settings = PRESETS["greedy"].updated(max_new_tokens=64)
    bot.respond(REPORT_MESSAGE, use_retrieval=use_retrieval, settings=settings)  # warm-up
    first, total, tokens = [], [], []
    for _ in range(runs):
        started = time.perf_counter()
        ttft = None
        for reply in bot.stream(REPORT_MESSAGE, use_retrieval=use_retrieval, settings=settings):
            if ttft is None and reply.text:
                ttft = time.perf_counter() - started
        total.append(time.perf_counter() - started)
        first.append(ttft or total[-1])
        tokens.append(len(bot.chat.tokenizer(reply.text, add_special_tokens=False)["input_ids"]))
    decode = [n / max(t - f, 1e-6) for n, t, f in zip(tokens, total, first)]
    return {"time_to_first_token": percentiles(first), "reply_latency": percentiles(total),
            "decode_tokens_per_s_median": round(statistics.median(decode), 1),
            "reply_tokens_median": statistics.median(tokens), "prompt_tokens": reply.prompt_tokens}


def main(argv: list[str] | None = None) -> int:
    """Print a JSON report of retrieval and reply timings."""
    from chatbot.bot import EmpatheticChatbot

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=None, help="data folder for held-out query messages")
    parser.add_argument("--index-dir", default=None, help="index folder (default: data/index/)")
    parser.add_argument("--queries", type=int, default=200, help="retrieval queries to time")
    parser.add_argument("--runs", type=int, default=5, help="replies to time per configuration")
    parser.add_argument("--skip-replies", action="store_true", help="only time retrieval")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bot = EmpatheticChatbot.from_pretrained(index_dir=args.index_dir)
    report: dict = {"retrieval": bench_retrieval(bot, args.data_dir, args.queries)} if bot.retriever else {}
    if not args.skip_replies:
        report["reply_with_retrieval"] = bench_reply(bot, args.runs, True)
        report["reply_without_retrieval"] = bench_reply(bot, args.runs, False)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
