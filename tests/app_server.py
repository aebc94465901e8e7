"""Helpers for the app tests: a tiny bot, the real bot with an index, and launching a demo on a free port."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from conftest import REAL_DATA  # noqa: E402

from chatbot.bot import EmpatheticChatbot  # noqa: E402
from chatbot.data import load_conversations, load_examples  # noqa: E402
from chatbot.embeddings import embed
from chatbot.emotion import train_detector  # noqa: E402
from chatbot.generation import DEFAULT_PRESET, PRESETS  # noqa: E402
from chatbot.models import wrap_model  # noqa: E402
from chatbot.retriever import Retriever, build_from_data, build_index  # noqa: E402
from chatbot.runtime import PROJECT_ROOT  # noqa: E402
from chatbot.safety import CrisisScreen  # noqa: E402
from chatbot.web import launch_options  # noqa: E402
from chatbot.web.page import SLIDER_ROWS  # noqa: E402

SLIDERS = [name for row in SLIDER_ROWS for name in row]
# The generation controls as the page sends them: by name, at the default preset's values.
CONTROLS = {"preset": DEFAULT_PRESET, **{name: float(getattr(PRESETS[DEFAULT_PRESET], name)) for name in SLIDERS}}
OUTPUT_DIR = PROJECT_ROOT / "test-output"
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_bot(tokenizer, embedder, synthetic_data: Path, index_dir: Path) -> EmpatheticChatbot:
    """A fast bot: random 2-layer GPT-2, a synthetic index, an emotion classifier trained on synthetic data."""
    from conftest import make_tiny_gpt2

    build_index(load_examples(synthetic_data, "train"), embedder, index_dir, "checksum")
    conversations = load_conversations(synthetic_data, "train")
    texts = [c.turns[0].text for c in conversations] + [c.situation for c in conversations]
    labels = [c.emotion for c in conversations] * 2
    emotion = train_detector(embedder, embed(embedder, texts), labels, texts, labels)
    chat = wrap_model(make_tiny_gpt2(tokenizer), tokenizer, "tiny-gpt2", device="cpu")
    return EmpatheticChatbot(chat, retriever=Retriever(index_dir, embedder), emotion=emotion,
                             crisis=CrisisScreen(embedder), embedder=embedder)


def updating_screenshots() -> bool:
    """Whether this run should refresh the README screenshots under assets/screenshots/."""
    return os.environ.get("UPDATE_SCREENSHOTS") == "1"


@functools.cache
def real_bot() -> EmpatheticChatbot:
    """The bot `app.py` serves, with retrieval on (a small index from the real data when none is built).

    Skips the calling test when there is neither an index nor the real data.
    """
    bot = EmpatheticChatbot.from_pretrained()
    if bot.retriever is None:
        if not (REAL_DATA / "train.csv").exists():
            pytest.skip(f"no index and no real data at {REAL_DATA}")
        index_dir = Path(tempfile.mkdtemp(prefix="ed-app-index-")) / "index"
        # Screenshots get a fuller index; plain test runs a small, quick one.
        build_from_data(REAL_DATA, index_dir, bot.embedder, limit=2000 if updating_screenshots() else 300)
        bot.enable_retrieval(index_dir)
    return bot


@contextmanager
def serve(demo, **launch) -> Iterator[str]:
    """Launch `demo` on a free local port for the duration of the block (as app.py does); yields its URL.

    `launch` adds or overrides `demo.launch` arguments (auth, allowed_paths...).
    """
    port = free_port()
    demo.launch(**{"server_name": "127.0.0.1", "server_port": port, "prevent_thread_lock": True, "quiet": True,
                   "ssr_mode": False, **launch_options(), **launch})
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def ui_handler(demo, name: str):
    """A page event handler by function name (page events are not part of the documented API)."""
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__name__", None) == name:
            return block_fn.fn
    raise LookupError(name)


def by_id(update: dict) -> dict:
    """A handler's update ({component: value}) keyed by the components' elem_id (a gr.State as "state")."""
    return {getattr(component, "elem_id", None) or "state": value for component, value in update.items()}


def chat(demo, message: str, history: list | None = None, retrieval: bool = True, **controls: object) -> list[dict]:
    """Every update the chat handler yields for one message (`controls`: preset and sliders other than the default)."""
    updates = ui_handler(demo, "run_chat")(message=message, history_value=history or [], retrieval=retrieval,
                                           **{**CONTROLS, **controls})
    return [by_id(update) for update in updates]
