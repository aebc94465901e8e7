"""The Gradio app: its API through gradio_client, its page handlers, the Space index build and the command line.

Most tests serve `chatbot.web.build_demo` on a tiny random GPT-2 (fast); one integration test serves the real
model. Importing `app` loads no model: `app.demo` is built on first use.
"""

from __future__ import annotations

import csv
import http.client
import importlib
import os
import sys
import time

import gradio as gr
import httpx
import pytest
from app_server import CONTROLS, SLIDERS, by_id, chat, real_bot, serve, tiny_bot, ui_handler
from gradio_client import Client

from chatbot import options
from chatbot.bot import EMPTY_MESSAGE_REPLY, MAX_MESSAGE_CHARS, EmpatheticChatbot, Reply
from chatbot.generation import DEFAULT_PRESET, PRESETS
from chatbot.retriever import RetrievedDialogue
from chatbot.runtime import ASSETS_DIR, PROJECT_ROOT
from chatbot.safety import CRISIS_REPLY, CrisisScreen
from chatbot.web import build_demo, page, render, server

XSS = "<img src=x onerror=alert(1)> <script>alert(1)</script>"
RETRIEVED_KEYS = {"score", "emotion", "situation", "context", "response", "conv_id"}


@pytest.fixture(scope="module")
def bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory) -> EmpatheticChatbot:
    """A fast bot with a synthetic index and emotion classifier."""
    return tiny_bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory.mktemp("app") / "index")


@pytest.fixture(scope="module")
def demo(bot):
    return build_demo(bot)


@pytest.fixture(scope="module")
def client(demo):
    with serve(demo) as url:
        yield Client(url, verbose=False)


def compare(demo, message: str, left: str, right: str, session: dict) -> list[dict]:
    """Every update the compare handler yields for one message."""
    updates = ui_handler(demo, "run_compare")(message=message, left_system=left, right_system=right,
                                              session=session, **CONTROLS)
    return [by_id(update) for update in updates]


def no_model(bot, monkeypatch):
    monkeypatch.setattr(bot, "_generate", lambda *a, **k: pytest.fail("the model was called"))


# ---------------------------------------------------------------------------------------------- API


def test_api_shows_exactly_the_two_documented_endpoints(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == {"/respond", "/compare"}
    assert not info.get("unnamed_endpoints")
    names = {path: [p["parameter_name"] for p in e["parameters"]] for path, e in info["named_endpoints"].items()}
    assert names == {"/respond": ["message", "history", "use_retrieval"], "/compare": ["message", "left", "right"]}


def test_respond_returns_reply_emotion_and_retrieved_dialogues(client, bot):
    history = [{"role": "user", "content": "My goldfish is sick."}, {"role": "assistant", "content": "Oh no."}]
    reply, emotion, retrieved = client.predict("He died this morning.", history, True, api_name="/respond")
    assert isinstance(reply, str) and reply.strip()
    assert emotion in bot.emotion.labels
    assert len(retrieved) == bot.k and all(set(r) == RETRIEVED_KEYS for r in retrieved)
    assert retrieved[0]["score"] >= retrieved[-1]["score"]


def test_respond_without_retrieval_retrieves_nothing(client):
    reply, emotion, retrieved = client.predict("We adopted a puppy!", [], False, api_name="/respond")
    assert reply.strip() and emotion and retrieved == []


def test_compare_returns_two_replies(client):
    left, right = client.predict("My trip got cancelled.", "base", "tuned+rag", api_name="/compare")
    assert isinstance(left, str) and left.strip() and isinstance(right, str) and right.strip()
    assert all(s.strip() for s in client.predict("I passed my exam!", api_name="/compare"))


@pytest.mark.parametrize("message", ["", "   \n\t  "])
def test_empty_message_gets_a_gentle_prompt_without_a_model_call(client, bot, monkeypatch, message):
    no_model(bot, monkeypatch)
    assert client.predict(message, [], True, api_name="/respond") == (EMPTY_MESSAGE_REPLY, "", [])
    assert client.predict(message, api_name="/compare") == (EMPTY_MESSAGE_REPLY, EMPTY_MESSAGE_REPLY)


def test_100k_character_message_is_answered_in_normal_time(client):
    started = time.perf_counter()
    reply, emotion, retrieved = client.predict("so tired " * 11_200, [], True, api_name="/respond")
    assert reply.strip() and emotion and retrieved
    assert time.perf_counter() - started < 60


def test_crisis_message_gets_the_fixed_safety_reply(client, bot, monkeypatch):
    no_model(bot, monkeypatch)
    assert client.predict("I want to kill myself", [], True, api_name="/respond") == (CRISIS_REPLY, "", [])


# ---------------------------------------------------------------------------------------------- page handlers


def test_chat_streams_a_growing_reply_with_emotion_and_retrieved_dialogues(demo, bot):
    outputs = chat(demo, "My goldfish died this morning.")
    last = outputs[-1]
    assert outputs[0]["message"] == ""  # the textbox is cleared at once
    replies = [o["chatbot"][-1]["content"] for o in outputs[1:]]
    assert len(set(replies)) >= 2 and replies[-1]
    # While the reply grows only the bubbles change; emotion, panel and notes come with the first and last text.
    assert all(set(o) == {"chatbot", "state"} for o in outputs[2:-1])
    assert [m["role"] for m in last["state"]] == ["user", "assistant"] and last["state"][1]["content"] == replies[-1]
    assert list(last["emotion"])[0] in bot.emotion.labels
    assert last["retrieved"].count('class="ed-card"') == bot.k
    assert last["crisis-banner"]["visible"] is False
    again = chat(demo, "They said it was old age.", last["state"], retrieval=False)[-1]
    assert len(again["state"]) == 4 and "Retrieval is off" in again["retrieved"]


def test_chat_handles_empty_long_html_and_crisis_messages(demo, bot, monkeypatch):
    no_model(bot, monkeypatch)
    (update,) = chat(demo, "  ")
    assert set(update) == {"notes"} and EMPTY_MESSAGE_REPLY in update["notes"]  # nothing else changes
    last = chat(demo, "I want to kill myself")[-1]
    assert last["state"][-1]["content"] == CRISIS_REPLY and "988" in last["chatbot"][-1]["content"]
    assert "Safety message" in last["chatbot"][-1]["metadata"]["title"]
    assert last["crisis-banner"]["visible"] is True and "988" in last["crisis-banner"]["value"]
    monkeypatch.undo()
    last = chat(demo, "word " * 20_000)[-1]
    assert f"shortened to its first {MAX_MESSAGE_CHARS}" in last["notes"]
    assert len(last["chatbot"][0]["content"]) <= MAX_MESSAGE_CHARS
    last = chat(demo, XSS)[-1]
    assert "<img" not in last["chatbot"][0]["content"] and "&lt;script&gt;" in last["chatbot"][0]["content"]
    assert last["state"][0]["content"] == XSS  # the bot sees what was typed


def test_compare_streams_both_sides_and_offers_a_csv(demo, bot):
    outputs = compare(demo, "My trip got cancelled.", "base", "tuned+rag", {"rows": [], "folder": None})
    last = outputs[-1]
    assert last["left-reply"].strip() and last["right-reply"].strip()
    assert last["compare-retrieved"].count('class="ed-card"') == bot.k
    assert any(o.get("left-reply") and o.get("right-reply") for o in outputs[1:-1])  # one batched decode
    last = compare(demo, XSS, "tuned", "base", last["state"])[-1]
    assert "Retrieval is off" in last["compare-retrieved"]  # neither side retrieves
    with open(last["download-csv"]["value"], newline="", encoding="utf-8") as fh:
        saved = list(csv.reader(fh))
    assert saved[0] == ["Message", "Left system", "Left reply", "Right system", "Right reply"]
    assert [r[0] for r in saved[1:]] == ["My trip got cancelled.", XSS] and saved[2][1] == "tuned"


def test_generation_controls_reach_the_handlers_by_name(demo):
    for name in ("run_chat", "run_compare"):
        event = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", None) == name)
        assert set(event.input_keyword_names) >= set(CONTROLS)
    settings = page.chosen_settings("report", {"temperature": 0.5, "top_p": 0.8, "max_new_tokens": 40.0,
                                               "repetition_penalty": 1.3, "num_beams": 2.0})
    assert settings == PRESETS["report"].updated(temperature=0.5, top_p=0.8, max_new_tokens=40,
                                                 repetition_penalty=1.3, num_beams=2)
    assert isinstance(settings.max_new_tokens, int) and isinstance(settings.num_beams, int)


def test_preset_sets_the_sliders_and_defaults_come_from_the_default_preset(demo):
    config = demo.get_config_file()
    sliders = {c["props"]["elem_id"]: c["props"]["value"] for c in config["components"] if c["type"] == "slider"}
    chosen = PRESETS[DEFAULT_PRESET]
    assert sliders == {name.replace("_", "-"): getattr(chosen, name) for name in SLIDERS}
    report = PRESETS["report"]
    update = by_id(ui_handler(demo, "apply_preset")("report"))
    assert [update[name.replace("_", "-")]["value"] for name in SLIDERS] == [getattr(report, n) for n in SLIDERS]
    assert update["temperature"]["interactive"] is False and "beam search" in update["preset-info"]


def test_retrieved_panel_escapes_text_and_explains_when_empty(bot):
    item = RetrievedDialogue(0.9, "sad", XSS, f"{XSS}\nsecond line", "<b>hi</b>", "c1")
    html = render.retrieved_html(Reply(text="x", retrieved=[item]), True, bot, None)
    assert "<img" not in html and "<script" not in html and "<b>hi" not in html and "&lt;b&gt;hi" in html
    no_index = EmpatheticChatbot(bot.chat)
    assert "No retrieval index is loaded" in render.retrieved_html(Reply(text="x"), True, no_index, None)
    assert "Retrieval is off" in render.retrieved_html(Reply(text="x"), False, bot, None)
    assert "safety" in render.retrieved_html(Reply(text="x", kind="crisis"), True, bot, None)


def markdown_text(demo) -> str:
    return " ".join(str(c["props"].get("value")) for c in demo.get_config_file()["components"]
                    if c["type"] == "markdown")


def test_about_lists_results_models_licence_and_disclaimer(demo):
    text = markdown_text(demo)
    for expected in ["CC BY-NC 4.0", "Rashkin", "Towards Empathetic Open-domain Conversation Models",
                     "not a therapist", "988", "findahelpline.com", "emergency number", "tiny-gpt2",
                     "8 dialogues"]:
        assert expected in text, expected
    for shipped in ("results.md", "training/results.md"):  # the evaluation tables as eval.py wrote them
        assert (ASSETS_DIR / "results" / shipped).read_text(encoding="utf-8").strip() in text, shipped
    assert "does not exist yet" not in text


def test_about_says_which_command_makes_a_missing_result(bot, monkeypatch, tmp_path):
    monkeypatch.setattr(page, "ASSETS_DIR", tmp_path)
    text = markdown_text(build_demo(bot))
    assert "Run `python eval.py` to produce it" in text and "Run `python data_stats.py` to produce it" in text
    assert "# Evaluation results" not in text  # no table at all when there is none


def test_adapter_metrics_show_as_a_table():
    table = render.metrics_markdown({"test_perplexity": 19.1551, "train_tokens": 1419704, "train_losses": [3.1, 2.9],
                                     "test_perplexity_detail": {"nll": 14060.1}, "protocol": "300 <b>replies</b>"})
    assert "| Test perplexity | 19.16 |" in table and "| Train tokens | 1,419,704 |" in table
    assert "nll" not in table and "{" not in table and "[" not in table
    assert table.endswith("Protocol: 300 &lt;b&gt;replies&lt;/b&gt;")


# ---------------------------------------------------------------------------------------------- start-up


def test_space_builds_the_index_in_the_background(gpt2_tokenizer, embedder, synthetic_data, tmp_path):
    from conftest import make_tiny_gpt2

    from chatbot.models import wrap_model

    chat_model = wrap_model(make_tiny_gpt2(gpt2_tokenizer), gpt2_tokenizer, "tiny-gpt2", device="cpu")
    bot = EmpatheticChatbot(chat_model, embedder=embedder, crisis=CrisisScreen(None),
                            notes=["Retrieval is off: no index"])
    assert server.start_index_build(bot, env={}, index_dir=tmp_path / "index") is None
    build = server.start_index_build(bot, env={"SPACE_ID": "me/chat"}, index_dir=tmp_path / "index",
                                     data_dir=str(synthetic_data))
    assert build is not None and "Building the retrieval index" in render.status_markdown(bot, build)
    build.thread.join(timeout=120)
    assert not build.running and build.error is None and bot.retriever is not None
    assert "Retrieval is off" not in render.status_markdown(bot, build)
    assert bot.respond("My goldfish died", settings=PRESETS["greedy"].updated(max_new_tokens=4)).retrieved


def parse_app(argv: list[str]) -> tuple:
    """The app's flags and its bot's, as `python app.py` parses them."""
    import app

    return options.Parser((app.AppArguments, options.BotArguments)).parse(argv)


def test_command_line_flags(monkeypatch):
    monkeypatch.delenv("ED_AUTH", raising=False)
    args, bot_args = parse_app([])
    assert (args.host, args.port, args.share, args.auth) == (None, None, False, None)  # Gradio: 127.0.0.1:7860
    assert bot_args == options.BotArguments()
    monkeypatch.setenv("ED_AUTH", "me:secret")
    assert parse_app([])[0].auth == "me:secret"
    args, bot_args = parse_app(["--share", "--port", "9000", "--base-model", "gpt2", "--adapter", "none",
                                "--index-dir", "idx", "--k", "5", "--preset", "report", "--data-dir", "ed"])
    assert (args.share, args.port, args.data_dir) == (True, 9000, "ed")
    assert bot_args == options.BotArguments("gpt2", "none", "idx", 5, "report")
    for bad in (["--auth", "no-colon"], ["--k", "0"], ["--preset", "fast"]):
        with pytest.raises(SystemExit):
            parse_app(bad)


def test_importing_app_loads_no_model_and_demo_is_built_on_first_use(bot, monkeypatch):
    loads = []
    monkeypatch.setattr(EmpatheticChatbot, "from_pretrained", lambda *args, **kwargs: loads.append(args) or bot)
    monkeypatch.delitem(sys.modules, "app", raising=False)
    app = importlib.import_module("app")
    assert loads == [] and "demo" not in vars(app)
    demo = app.demo  # what Spaces and `gradio app.py` look up
    assert isinstance(demo, gr.Blocks) and demo.enable_queue and app.demo is demo and len(loads) == 1


# ---------------------------------------------------------------------------------------------- security

# Ways to ask the file routes for something outside assets/ (sent as typed: http.client does not tidy "..").
TRAVERSALS = [
    "/gradio_api/file=../../../../etc/passwd", "/gradio_api/file=/etc/passwd", "/gradio_api/file=%2Fetc%2Fpasswd",
    "/gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/file=....//....//etc/passwd", "/file=/etc/passwd", "/file=../../etc/passwd",
    "/gradio_api/file={root}/app.py", "/gradio_api/file={root}/README.md", "/gradio_api/file=app.py",
    "/gradio_api/file=README.md", "/gradio_api/file=./app.py", "/gradio_api/file={root}/.venv/pyvenv.cfg",
    "/gradio_api/file={root}/assets/../app.py", "/gradio_api/file={root}/data/index/manifest.json",
    "/static/../../app.py", "/assets/..%2F..%2F..%2Fapp.py", "/gradio_api/file=http://127.0.0.1:{port}/config",
]


def raw_get(url: str, path: str, **headers) -> tuple[int, bytes]:
    """GET `path` exactly as written (no URL normalisation)."""
    host, port = url.split("//")[1].strip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


@pytest.fixture(scope="module")
def guarded_url(bot):
    """A second server of the app, allowing the project folder as a careless GRADIO_ALLOWED_PATHS would."""
    with serve(build_demo(bot), allowed_paths=[str(PROJECT_ROOT)]) as url:
        yield url


@pytest.fixture(scope="module")
def late_index(client, guarded_url):
    """data/index/manifest.json, made after both servers started (as a Space builds its index); removed after."""
    path = PROJECT_ROOT / "data" / "index" / "manifest.json"
    made = [p for p in (path.parent.parent, path.parent, path) if not p.exists()]
    if made:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"Empathetic": "made by the test"}')
    yield path
    for made_path in reversed(made):
        made_path.unlink() if made_path.is_file() else made_path.rmdir()


@pytest.mark.parametrize("path", TRAVERSALS)
def test_file_routes_serve_nothing_outside_assets(client, guarded_url, late_index, path):
    assert late_index.exists()  # so its request is refused for being blocked, not for being missing
    for url in (client.src, guarded_url):
        port = url.strip("/").rsplit(":", 1)[1]
        status, body = raw_get(url, path.format(root=PROJECT_ROOT, port=port))
        assert status in (400, 403, 404), (url, status, body[:200])
        assert b"root:" not in body and b"import gradio" not in body and b"Empathetic" not in body


def test_file_routes_still_serve_the_pages_own_files(client, guarded_url):
    config = httpx.get(client.src.rstrip("/") + "/config").json()
    figures = [c["props"]["value"]["path"] for c in config["components"]
               if c["type"] == "image" and c["props"].get("value")]
    assert figures, "the About tab shows no figure"
    status, body = raw_get(client.src, f"/gradio_api/file={figures[0]}")
    assert status == 200 and body[:4] == b"\x89PNG"
    # Allowed explicitly, assets/ is served; the rest of the project stays blocked.
    assert raw_get(guarded_url, f"/gradio_api/file={PROJECT_ROOT}/assets/ui/app.css")[0] == 200


def test_launch_blocks_the_project_and_bounds_requests(monkeypatch):
    monkeypatch.delenv("ED_AUTH", raising=False)
    launch = parse_app(["--auth", "me:pass:word"])[0].launch_kwargs()
    assert (launch["server_name"], launch["share"], launch["auth"]) == (None, False, ("me", "pass:word"))
    assert launch["max_file_size"] == server.MAX_REQUEST_BYTES
    blocked = list(launch["blocked_paths"])
    assert {str(PROJECT_ROOT / "app.py"), str(PROJECT_ROOT / "data")} <= set(blocked)
    assert not any(p.startswith(str(ASSETS_DIR)) for p in blocked)
    assert parse_app([])[0].launch_kwargs()["auth"] is None


def test_oversized_request_is_refused_and_the_server_keeps_serving(client):
    url = client.src.rstrip("/") + "/gradio_api/call/respond"
    big = httpx.post(url, json={"data": ["x" * server.MAX_REQUEST_BYTES, [], False]})
    assert big.status_code == 413 and f"{server.MAX_REQUEST_BYTES // 1024} KiB" in big.json()["detail"]
    chunked = httpx.post(url, content=iter([b'{"data": ["' + b"x" * 65536] * 16 + [b'"]}']),
                         headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and "KiB" in chunked.json()["detail"]
    small = httpx.post(url, content=iter([b'{"data": ', b'["Hello.", [], false]}']),
                       headers={"Content-Type": "application/json"})
    assert small.status_code == 200 and small.json()["event_id"]  # a small chunked body goes through whole
    assert client.predict("Still there?", [], False, api_name="/respond")[0].strip()


def test_login_is_required_when_auth_is_set(bot):
    with serve(build_demo(bot), auth=("me", "secret")) as url:
        assert httpx.get(url + "config").status_code == 401
        assert httpx.post(url + "gradio_api/call/respond", json={"data": ["hi", [], False]}).status_code == 401
        assert httpx.get(url + "gradio_api/info").status_code == 401
        with pytest.raises(Exception, match="(?i)login|auth|401"):
            Client(url, verbose=False)
        with pytest.raises(Exception, match="(?i)login|auth|401|incorrect"):
            Client(url, auth=("me", "wrong"), verbose=False)
        client = Client(url, auth=("me", "secret"), verbose=False)
        assert client.predict("Hello, it's me.", [], False, api_name="/respond")[0].strip()


@pytest.mark.integration
def test_real_model_answers_through_the_api():
    bot = real_bot()
    with serve(build_demo(bot)) as url:
        reply, emotion, retrieved = Client(url, verbose=False).predict(
            "My dog died today. I am so distraught.", [], True, api_name="/respond")
    assert len(reply.split()) >= 3 and retrieved
    assert emotion in bot.emotion.labels  # the classifier ships in assets/emotion


def test_the_server_names_a_matplotlib_backend_unless_one_is_chosen(monkeypatch):
    """Gradio switches matplotlib's backend around every event; named up front, the first one skips pyplot."""
    from chatbot.runtime import headless_matplotlib

    monkeypatch.delenv("MPLBACKEND", raising=False)
    headless_matplotlib()
    assert os.environ["MPLBACKEND"] == "Agg"
    monkeypatch.setenv("MPLBACKEND", "pdf")
    headless_matplotlib()
    assert os.environ["MPLBACKEND"] == "pdf"
