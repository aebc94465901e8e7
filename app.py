"""Empathetic Chat, the Gradio web app: `python app.py` (see `--help`). The page itself is in chatbot/web/.

Importing this file loads nothing. `app.demo` (what Hugging Face Spaces and `gradio app.py` look up) builds the
bot and the page on first use, with the default flags; `python app.py` builds them with the flags given.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatbot import options
from chatbot.runtime import app_auth, headless_matplotlib, limit_malloc_arenas

if TYPE_CHECKING:
    import gradio as gr


@dataclass
class AppArguments:
    """Where the app listens and who may use it (the bot it serves: options.BotArguments)."""

    host: str | None = options.option(None, "interface to listen on; 0.0.0.0 for all "
                                            "(unset: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    port: int | None = options.option(None, "port to listen on (unset: $GRADIO_SERVER_PORT, else 7860)")
    share: bool = options.option(False, "also create a public gradio.live link")
    auth: str | None = options.option(None, "require a login, given as user:password (unset: $ED_AUTH, else no login)")
    data_dir: str | None = options.data_dir_option()  # where a Space's first start reads the data for its index

    def __post_init__(self) -> None:
        """Check the flags before anything loads."""
        self.auth = self.auth or app_auth()
        if self.auth and ":" not in self.auth:
            raise ValueError("--auth must look like user:password")

    def launch_kwargs(self) -> dict:
        """`demo.launch` arguments: these flags, and the theme and limits every launch uses."""
        from chatbot.web import launch_options

        auth = tuple(self.auth.split(":", 1)) if self.auth else None
        return {"server_name": self.host, "server_port": self.port, "share": self.share, "auth": auth,
                **launch_options()}


def make_demo(args: AppArguments, bot_args: options.BotArguments) -> gr.Blocks:
    """Load the bot (building the index in the background on a Space) and lay out the page for it."""
    limit_malloc_arenas()  # before the model and the worker threads allocate: memory stays flat under load
    headless_matplotlib()
    with ThreadPoolExecutor(1, thread_name_prefix="bot-load") as pool:
        # Loading the models is mostly native work that releases the GIL: it runs while gradio is imported
        # here (pure Python), so the page is up sooner.
        loading = pool.submit(bot_args.load)
        from chatbot.web import build_demo, start_index_build

        bot = loading.result()
    return build_demo(bot, start_index_build(bot, index_dir=bot_args.index_dir, data_dir=args.data_dir),
                      bot_args.preset)


def __getattr__(name: str) -> gr.Blocks:
    """`app.demo`, built once on first use (PEP 562), so that importing this file loads no model."""
    if name != "demo":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global demo
    demo = make_demo(AppArguments(), options.BotArguments())
    return demo


def main(argv: list[str] | None = None) -> None:
    """Parse the flags (so --help and typos answer before the model loads), build the app and serve it."""
    parser = options.Parser((AppArguments, options.BotArguments), description=__doc__.split("\n\n")[0])
    args, bot_args = parser.parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    global demo
    demo = make_demo(args, bot_args)
    demo.launch(**args.launch_kwargs())


if __name__ == "__main__":
    main()
