"""The server around the page: request limits, files never served, and the index built on a Space's first start."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import gradio as gr
from gradio.route_utils import FnIndexInferError
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot.bot import MAX_MESSAGE_CHARS, EmpatheticChatbot
from chatbot.retriever import build_from_data
from chatbot.runtime import ASSETS_DIR, PROJECT_ROOT, default_index_dir

logger = logging.getLogger(__name__)

CSS_PATH = ASSETS_DIR / "ui" / "app.css"
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="rose")
# Every request body is capped: a message is cut to MAX_MESSAGE_CHARS anyway, and the page uploads no files.
# 512 KiB leaves room for a full API history (40 x 4000 characters) and refuses a 1 MB message outright.
MAX_REQUEST_BYTES = 512 * 1024


class IndexBuild:
    """Builds the retrieval index in a background thread (first start of a Hugging Face Space)."""

    def __init__(self, bot: EmpatheticChatbot, index_dir: Path, data_dir: str | None = None):
        """Remember what to build; `start` runs it."""
        self.bot, self.index_dir, self.data_dir = bot, Path(index_dir), data_dir
        self.running, self.error = False, None
        self.thread: threading.Thread | None = None

    def start(self) -> IndexBuild:
        """Start building in a daemon thread."""
        self.running = True
        self.thread = threading.Thread(target=self.run, name="index-build", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        """Build the index (downloading the data when needed) and switch retrieval on."""
        try:
            logger.info("Building the retrieval index at %s", self.index_dir)
            build_from_data(self.data_dir, self.index_dir, self.bot.embedder)
            self.bot.enable_retrieval(self.index_dir)
            logger.info("Retrieval index ready")
        except Exception as err:  # the app keeps serving without retrieval
            logger.exception("Building the retrieval index failed")
            self.error = str(err)
        finally:
            self.running = False


def start_index_build(bot: EmpatheticChatbot, env: dict | None = None, index_dir: Path | None = None,
                      data_dir: str | None = None) -> IndexBuild | None:
    """On a Space ($SPACE_ID set) without an index, build one in the background; otherwise do nothing."""
    env = os.environ if env is None else env
    if not env.get("SPACE_ID") or bot.retriever is not None or bot.embedder is None:
        return None
    return IndexBuild(bot, index_dir or default_index_dir(), data_dir).start()


class BodySizeLimit:
    """ASGI middleware that answers 413 to request bodies over `max_bytes`, declared or sent in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES):
        """Wrap `app`."""
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared length; a body sent without one is read here (up to the limit), then handed on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            fits = declared.isdigit() and int(declared) <= self.max_bytes
            await (self.app(scope, receive, send) if fits else self.refuse(scope, receive, send))
            return
        body, message = b"", {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self.refuse(scope, receive, send)
                return
        whole: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 with a JSON detail that says what the limit is."""
        await JSONResponse({"detail": f"Request body too large: the limit is {self.max_bytes // 1024} KiB "
                                      f"(messages are cut to {MAX_MESSAGE_CHARS} characters anyway)."},
                           status_code=413)(scope, receive, send)


class BlockedPaths(list):
    """Everything in the project except assets/, listed afresh whenever Gradio checks a file request.

    So a folder made after start-up (the index a Space builds in data/) is never served either, even if
    GRADIO_ALLOWED_PATHS names the project: Gradio applies blocked paths before any allow-list.
    """

    def __init__(self) -> None:
        """Start with the current listing (Gradio ignores an empty list)."""
        super().__init__(self.current())

    @staticmethod
    def current() -> list[str]:
        """The project's entries except assets/, and the index folder wherever $ED_INDEX_DIR puts it."""
        entries = {str(path) for path in PROJECT_ROOT.iterdir() if path.name != ASSETS_DIR.name}
        return sorted(entries | {str(PROJECT_ROOT / "data"), str(default_index_dir())})

    def __iter__(self):
        """A fresh listing at each check."""
        return iter(self.current())


async def unknown_endpoint(request: Request, error: FnIndexInferError) -> JSONResponse:
    """404 for an API name the app does not have (Gradio itself answers a bare 500)."""
    return JSONResponse({"detail": f"No such endpoint: {request.url.path}"}, status_code=404)


def launch_options() -> dict:
    """Theme, style and limits every launch uses (Gradio 6 takes them in `launch`, not in `Blocks`)."""
    return {"theme": THEME, "css_paths": [CSS_PATH], "footer_links": ["api", "gradio"],
            "max_file_size": MAX_REQUEST_BYTES, "blocked_paths": BlockedPaths(),
            "app_kwargs": {"middleware": [Middleware(BodySizeLimit, max_bytes=MAX_REQUEST_BYTES)],
                           "exception_handlers": {FnIndexInferError: unknown_endpoint}}}
