"""The one prompt format: training, inference, evaluation and tests all build prompts here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from chatbot.data import LISTENER, SPEAKER, Turn

# Bump when the rendered prompt changes: adapters record it and refuse a different one.
PROMPT_FORMAT_VERSION = "ed-chat-v1"

SYSTEM_INSTRUCTION = (
    "You are a warm, caring listener. Someone is telling you about something that happened to them. "
    "Reply in one or two short sentences: show that you understand how they feel and, when it helps, "
    "ask a gentle follow-up question. No lists, no advice lectures."
)
EXAMPLES_NOTE = (
    "The first {n} exchanges are examples from other people's similar conversations, to show the tone; "
    "the real conversation follows them."
)
# GPT-2 style models have no chat template; this one renders the same messages as plain dialogue text.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Speaker: {{ m['content'] }}\n"
    "{% else %}Listener: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Listener:{% endif %}"
)
# Text after which a reply is over: the model has started the next turn.
TURN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "\nSpeaker:", "Speaker:", "\nListener:", "\nUser:")
ROLE_OF = {SPEAKER: "user", LISTENER: "assistant"}
# Chat-template control strings (<|im_start|>, <|im_end|>, <|endoftext|>, ...): typed into a message they
# would become real special tokens and let a user forge turns or a system message.
CONTROL_TOKEN = re.compile(r"<\|([A-Za-z_]{1,30})\|>")
# A sentence is complete once white space follows its final punctuation.
SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)")
DEFAULT_MAX_PROMPT_TOKENS = 768
MAX_EXAMPLE_CHARS = 200


class Reference(Protocol):
    """What a retrieved dialogue must offer the prompt (see chatbot.retriever.RetrievedDialogue)."""

    context: str
    response: str


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and what went into it after the token budget was applied."""

    text: str
    messages: tuple[dict[str, str], ...]
    token_count: int
    history_turns_used: int
    references_used: int


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a chat template, a pad token and left padding (needed for batched generation)."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def neutralise_control_tokens(text: str) -> str:
    """Break chat-template control strings apart so the tokenizer reads them as plain text."""
    return CONTROL_TOKEN.sub(r"< |\1| >", text)


def _shorten(text: str, limit: int = MAX_EXAMPLE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def system_message(references: Sequence[Reference] = (), emotion: str | None = None) -> str:
    """The system instruction, with the detected emotion and a word on the example exchanges."""
    parts = [SYSTEM_INSTRUCTION]
    if emotion:
        parts.append(f"The person seems to feel {emotion}.")
    if references:
        parts.append(EXAMPLES_NOTE.format(n=len(references)))
    return "\n\n".join(parts)


def chat_messages(
    message: str, history: Sequence[Turn] = (), references: Sequence[Reference] = (), emotion: str | None = None
) -> list[dict[str, str]]:
    """Messages in chat-template form: system, retrieved example exchanges, the dialogue so far, the message."""
    messages = [{"role": "system", "content": system_message(references, emotion)}]
    # Retrieved dialogues go in as example exchanges: small models imitate turns far better than they
    # follow a quoted list (which the untuned model took for a text to edit). The most similar goes last,
    # next to the real conversation, where small models look hardest.
    for ref in reversed(references):
        said = ref.context.splitlines()[-1] if ref.context.strip() else ref.context
        messages += [{"role": "user", "content": _shorten(said)}, {"role": "assistant", "content": _shorten(ref.response)}]
    messages += [{"role": ROLE_OF[t.role], "content": t.text} for t in history]
    messages.append({"role": "user", "content": message})
    return [{"role": m["role"], "content": neutralise_control_tokens(m["content"])} if m["role"] != "system" else m
            for m in messages]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render messages with the tokenizer's chat template (or the plain one)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens the model will see for `text`."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    message: str,
    history: Sequence[Turn] = (),
    references: Sequence[Reference] = (),
    emotion: str | None = None,
    max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> Prompt:
    """Render a generation prompt within `max_tokens`: drop the oldest turns, then references; never the message."""
    history, references = list(history), list(references)
    while True:
        messages = chat_messages(message, history, references, emotion)
        text = render(tokenizer, messages, add_generation_prompt=True)
        tokens = count_tokens(tokenizer, text)
        if tokens <= max_tokens or not (history or references):
            return Prompt(text, tuple(messages), tokens, len(history), len(references))
        if history:
            # Drop a whole exchange so the dialogue still alternates speaker/listener.
            history = history[2:] if len(history) >= 2 else []
        else:
            references.pop()


def reply_target(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, reply: str) -> str:
    """The exact text the model must produce after `prompt` for `reply`, ending with the end-of-turn token."""
    messages = list(prompt.messages) + [{"role": "assistant", "content": reply}]
    full = render(tokenizer, messages, add_generation_prompt=False)
    end = tokenizer.eos_token
    if full.startswith(prompt.text):
        target = full[len(prompt.text):]
        index = target.find(end, target.find(reply) + len(reply))
        if index != -1:
            return target[: index + len(end)]
    return f"{reply}{end}"


def clean_reply(text: str) -> str:
    """Cut generated text where the model starts another turn, and tidy white space."""
    cut = len(text)
    for marker in TURN_MARKERS:
        index = text.find(marker)
        if index != -1:
            cut = min(cut, index)
    return " ".join(text[:cut].split())


def first_sentences(text: str, limit: int) -> str | None:
    """The first `limit` sentences once the text has gone past them (None while it has not, or limit 0)."""
    if limit <= 0:
        return None
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    if len(ends) >= limit and text[ends[limit - 1]:].strip():
        return text[: ends[limit - 1]]
    return None


def history_from_messages(messages: Sequence[dict]) -> list[Turn]:
    """Turn chat-UI messages ({role: user|assistant, content}) into dialogue turns."""
    roles = {"user": SPEAKER, "assistant": LISTENER}
    turns = []
    for item in messages:
        role, content = item.get("role"), item.get("content")
        if role not in roles or not isinstance(content, str) or not content.strip():
            continue
        turns.append(Turn(roles[role], content))
    return turns


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + reply, with labels only on the reply and its end-of-turn token."""

    input_ids: list[int]
    labels: list[int]
    prompt: Prompt


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Turn],
    reply: str,
    references: Sequence[Reference] = (),
    emotion: str | None = None,
    max_length: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> EncodedExample:
    """Encode history -> reply for training and scoring; the prompt is exactly the one inference builds."""
    # Leave room for the reply (up to half the budget); the prompt gives way first, as at inference.
    reply_room = min(count_tokens(tokenizer, reply) + 4, max_length // 2)
    prompt = build_prompt(tokenizer, history[-1].text, history[:-1], references, emotion, max_length - reply_room)
    prompt_ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(reply_target(tokenizer, prompt, reply), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return EncodedExample(input_ids, labels, prompt)
