"""The two documented API endpoints, /respond and /compare, and the checks on what callers send them."""

# No `from __future__ import annotations` here: gr.api reads the endpoints' type hints as real types.
from collections.abc import Callable

import gradio as gr

from chatbot.bot import EmpatheticChatbot
from chatbot.systems import SYSTEMS

DEFAULT_LEFT, DEFAULT_RIGHT = "base", "tuned+rag"
# History sent to the API is capped (the prompt only keeps the most recent turns anyway).
MAX_API_HISTORY_MESSAGES = 40
MAX_API_HISTORY_CHARS = 4000


def refuse(reason: str) -> gr.Error:
    """The error a caller sees: the reason alone, no server traceback in the log."""
    return gr.Error(reason, print_exception=False)


def check_system(name: object, which: str) -> str:
    """A known system name, or a clear gr.Error."""
    if not isinstance(name, str) or name not in SYSTEMS:
        raise refuse(f"Unknown {which} system {name!r}; choose one of: {', '.join(SYSTEMS)}")
    return name


def check_message(message: object) -> str:
    """The message as a string, or a clear gr.Error."""
    if not isinstance(message, str):
        raise refuse(f"message must be a string, not {type(message).__name__}")
    return message


def check_history(history: object) -> list[dict]:
    """Chat history as [{role: user|assistant, content: str}], or a clear gr.Error."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise refuse(f"history must be a list of {{role, content}} dicts, not {type(history).__name__}")
    checked = []
    for i, item in enumerate(history):
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant") \
                or not isinstance(item.get("content"), str):
            raise refuse(f"history[{i}] must be a dict with role 'user' or 'assistant' and a string content")
        checked.append({"role": item["role"], "content": item["content"][:MAX_API_HISTORY_CHARS]})
    return checked[-MAX_API_HISTORY_MESSAGES:]


def make_api(bot: EmpatheticChatbot) -> tuple[Callable, Callable]:
    """The two documented endpoints, as typed functions (gr.api derives their schema from the hints)."""

    def respond(message: str, history: list[dict] | None = None, use_retrieval: bool = True) -> tuple[str, str, list[dict]]:
        """Reply to `message` after `history` ([{"role": "user"|"assistant", "content": str}, ...]).

        Returns the reply text, the detected emotion label ("" when none) and the retrieved dialogues
        (a list of {score, emotion, situation, context, response, conv_id}).
        """
        message = check_message(message)
        history = check_history(history)
        if not isinstance(use_retrieval, bool):
            raise refuse(f"use_retrieval must be true or false, not {use_retrieval!r}")
        reply = bot.respond(message, history, use_retrieval=use_retrieval)
        label = reply.emotion.label if reply.emotion else ""
        return reply.text, label, [r.to_dict() for r in reply.retrieved]

    def compare(message: str, left: str = DEFAULT_LEFT, right: str = DEFAULT_RIGHT) -> tuple[str, str]:
        """Two systems' replies to one message with the same settings and seed.

        Systems: "base", "base+rag", "tuned", "tuned+rag", "tuned+rag+select". Returns (left reply, right reply).
        """
        message = check_message(message)
        left, right = check_system(left, "left"), check_system(right, "right")
        *_, (left_reply, right_reply) = bot.compare_stream(message, left, right)
        return left_reply.text, right_reply.text

    return respond, compare
