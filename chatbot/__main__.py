"""Terminal chat: `python -m chatbot` (REPL) or `python -m chatbot "message" --json`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from chatbot import options
from chatbot.bot import normalise_message
from chatbot.data import LISTENER, SPEAKER, Turn
from chatbot.generation import PRESETS
from chatbot.models import ModelLoadError
from chatbot.systems import SYSTEMS


def parse_args(argv: list[str] | None = None) -> tuple[options.BotArguments, argparse.Namespace]:
    """Command-line flags: the bot's (shared with the app), then the terminal chat's own."""
    parser = options.Parser(options.BotArguments, prog="python -m chatbot", description=__doc__)
    parser.add_argument("message", nargs="?", help="answer this one message and exit (omit for an interactive chat)")
    parser.add_argument("--system", choices=list(SYSTEMS), help="a named system (overrides --no-retrieval)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (reply, emotion, retrieved, crisis)")
    parser.add_argument("--no-retrieval", action="store_true", help="do not put retrieved dialogues in the prompt")
    parser.add_argument("--verbose", action="store_true", help="log loading details")
    args, chat = parser.parse(argv)
    # Checked before the model loads: an empty one-shot message is a usage error, not a chat turn.
    if chat.message is not None and not normalise_message(chat.message)[0]:
        parser.error("the message is empty (after removing control characters and white space)")
    return args, chat


def print_notes(notes: list[str]) -> None:
    """Start-up and per-reply notes go to stderr, so `--json` output stays one JSON object."""
    for note in notes:
        print(f"[note] {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Answer one message or run an interactive chat in the terminal."""
    args, chat = parse_args(argv)
    logging.basicConfig(level=logging.INFO if chat.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        bot = args.load()
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = PRESETS[args.preset]
    use_retrieval = not chat.no_retrieval
    print_notes(bot.notes)
    if chat.message is not None:
        reply = bot.respond(chat.message, use_retrieval=use_retrieval, settings=settings, system=chat.system)
        if chat.json:
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
        for reply in bot.stream(message, history, use_retrieval, settings, chat.system):
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
