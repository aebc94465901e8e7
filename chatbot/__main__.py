"""Terminal chat: `python -m chatbot` (REPL) or `python -m chatbot "message" --json`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from chatbot.bot import DEFAULT_K, SYSTEMS, EmpatheticChatbot, normalize_message
from chatbot.data import LISTENER, SPEAKER, Turn
from chatbot.generation import DEFAULT_PRESET, PRESETS
from chatbot.models import DEFAULT_BASE_MODEL, ModelLoadError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(prog="python -m chatbot", description=__doc__)
    parser.add_argument("message", nargs="?", help="answer this one message and exit (omit for an interactive chat)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (reply, emotion, retrieved, crisis)")
    parser.add_argument("--no-retrieval", action="store_true", help="do not put retrieved dialogues in the prompt")
    parser.add_argument("--system", choices=list(SYSTEMS), default=None,
                        help="a named system (overrides --no-retrieval): base, base+rag, tuned, tuned+rag")
    parser.add_argument("--adapter", default="default",
                        help="peft adapter folder, 'default' (the shipped one, when present) or 'none'")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL,
                        help="smollm2-135m-instruct (packaged), gpt2, distilgpt2, a hub id or a local folder")
    parser.add_argument("--index-dir", default=None, help="retrieval index folder (default: $ED_INDEX_DIR or data/index/)")
    parser.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET, help="generation settings preset")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="how many dialogues to retrieve")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--verbose", action="store_true", help="log loading details")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, not {args.k}")
    # Checked before the model loads: an empty one-shot message is a usage error, not a chat turn.
    if args.message is not None and not normalize_message(args.message)[0]:
        parser.error("the message is empty (after removing control characters and white space)")
    return args


def print_notes(notes: list[str]) -> None:
    """Start-up and per-reply notes go to stderr, so `--json` output stays one JSON object."""
    for note in notes:
        print(f"[note] {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Answer one message or run an interactive chat in the terminal."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        bot = EmpatheticChatbot.from_pretrained(args.base_model, args.adapter, args.index_dir, args.device, args.k)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = PRESETS[args.preset]
    use_retrieval = not args.no_retrieval
    print_notes(bot.notes)
    if args.message is not None:
        reply = bot.respond(args.message, use_retrieval=use_retrieval, settings=settings, system=args.system)
        if args.json:
            print(json.dumps(reply.to_dict(), ensure_ascii=False, indent=2))
        else:
            print_notes(reply.notes)
            print(reply.text)
        return 0
    if hasattr(sys.stdin, "reconfigure"):  # a pasted invalid UTF-8 byte shows as U+FFFD instead of ending the chat
        sys.stdin.reconfigure(errors="replace")
    print("Tell me how you feel (empty line or Ctrl-D to quit).")
    history: list[Turn] = []
    while True:
        try:
            message = input("you> ")
        except EOFError:
            break
        if not message.strip():
            break
        print("bot> ", end="", flush=True)
        shown = ""
        for reply in bot.stream(message, history, use_retrieval, settings, args.system):
            if reply.text.startswith(shown):
                print(reply.text[len(shown):], end="", flush=True)
            else:  # the final text replaced the streamed one (crisis or safety fallback)
                print("\n" + reply.text, end="")
            shown = reply.text
        emotion = f" [{reply.emotion.label} {reply.emotion.score:.0%}]" if reply.emotion else ""
        print(f"{emotion}{' [crisis resources]' if reply.crisis else ''}")
        print_notes(reply.notes)
        history += [Turn(SPEAKER, message), Turn(LISTENER, reply.text)]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
