"""The web app's page: layout and handlers (page), what it shows (render), its API (api), its server (server)."""

from chatbot.web.page import build_demo
from chatbot.web.server import launch_options, start_index_build

__all__ = ["build_demo", "launch_options", "start_index_build"]
