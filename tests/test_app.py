"""The Gradio app: its API through gradio_client, its page handlers, the Space index build and the CLI flags.

Most tests serve `app.build_demo` on a tiny random GPT-2 (fast); one integration test serves the real model.
Importing `app` loads the real model once, as a Space does.
"""

from __future__ import annotations

import csv
import http.client
import time

import httpx
import pytest
from app_server import real_bot, serve, tiny_bot
from gradio_client import Client

from chatbot.bot import EMPTY_MESSAGE_REPLY, MAX_MESSAGE_CHARS, EmpatheticChatbot, Reply
from chatbot.generation import DEFAULT_PRESET, PRESETS
from chatbot.retriever import RetrievedDialogue
from chatbot.runtime import PROJECT_ROOT
from chatbot.safety import CRISIS_REPLY, CrisisScreen

XSS = "<img src=x onerror=alert(1)> <script>alert(1)</script>"
RETRIEVED_KEYS = {"score", "emotion", "situation", "context", "response", "conv_id"}


@pytest.fixture(scope="module")
def app():
    """The app module (its import loads the real bot once)."""
    import app as module

    return module


@pytest.fixture(scope="module")
def bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory) -> EmpatheticChatbot:
    """A fast bot with a synthetic index and emotion classifier."""
    return tiny_bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory.mktemp("app") / "index")


@pytest.fixture(scope="module")
def demo(app, bot):
    return app.build_demo(bot)


@pytest.fixture(scope="module")
def client(demo):
    with serve(demo) as url:
        yield Client(url, verbose=False)


def ui_handler(demo, name: str):
    """A page event handler by function name (the page's events are private: no API access)."""
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__name__", None) == name:
            return block_fn.fn
    raise LookupError(name)


def default_controls() -> list:
    chosen = PRESETS[DEFAULT_PRESET]
    return [DEFAULT_PRESET, chosen.temperature, chosen.top_p, chosen.max_new_tokens, chosen.repetition_penalty,
            chosen.num_beams]


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
    outputs = list(ui_handler(demo, "run_chat")("My goldfish died this morning.", [], True, *default_controls()))
    textbox, chat, history, emotion, retrieved, notes, banner = outputs[-1]
    assert outputs[0][0] == ""  # the textbox is cleared at once
    replies = [o[1][-1]["content"] for o in outputs[1:]]
    assert len(set(replies)) >= 2 and replies[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"] == replies[-1]
    assert list(emotion)[0] in bot.emotion.labels
    assert retrieved.count('class="ed-card"') == bot.k
    assert banner["visible"] is False
    outputs = list(ui_handler(demo, "run_chat")("They said it was old age.", history, False, *default_controls()))
    assert len(outputs[-1][2]) == 4 and "Retrieval is off" in outputs[-1][4]


def test_chat_handles_empty_long_html_and_crisis_messages(demo, bot, monkeypatch):
    run_chat = ui_handler(demo, "run_chat")
    no_model(bot, monkeypatch)
    (update,) = list(run_chat("  ", [], True, *default_controls()))
    assert EMPTY_MESSAGE_REPLY in update[5]  # a gentle prompt in the notes; nothing else changes
    *_, last = run_chat("I want to kill myself", [], True, *default_controls())
    assert last[2][-1]["content"] == CRISIS_REPLY and "988" in last[1][-1]["content"]
    assert "Safety message" in last[1][-1]["metadata"]["title"]
    assert last[6]["visible"] is True and "988" in last[6]["value"]
    monkeypatch.undo()
    *_, last = run_chat("word " * 20_000, [], True, *default_controls())
    assert f"shortened to its first {MAX_MESSAGE_CHARS}" in last[5] and len(last[1][0]["content"]) <= MAX_MESSAGE_CHARS
    *_, last = run_chat(XSS, [], True, *default_controls())
    assert "<img" not in last[1][0]["content"] and "&lt;script&gt;" in last[1][0]["content"]
    assert last[2][0]["content"] == XSS  # the bot sees what was typed


def test_compare_streams_both_sides_and_offers_a_csv(demo, bot, tmp_path):
    run_compare = ui_handler(demo, "run_compare")
    table = {"rows": [], "folder": None}
    outputs = list(run_compare("My trip got cancelled.", "base", "tuned+rag", table, *default_controls()))
    left, right, panel, notes, table, rows, download = outputs[-1]
    assert left.strip() and right.strip() and panel.count('class="ed-card"') == bot.k
    assert any(o[0] and o[1] for o in outputs[1:-1])  # both sides stream at once (one batched decode)
    outputs = list(run_compare(XSS, "tuned", "base", table, *default_controls()))
    *_, table, rows, download = outputs[-1]
    assert "Neither system uses retrieval" in outputs[-1][2]
    with open(download["value"], newline="", encoding="utf-8") as fh:
        saved = list(csv.reader(fh))
    assert saved[0] == ["Message", "Left system", "Left reply", "Right system", "Right reply"]
    assert [r[0] for r in saved[1:]] == ["My trip got cancelled.", XSS] and saved[2][1] == "tuned"


def test_preset_sets_the_sliders_and_defaults_come_from_the_default_preset(demo, app):
    config = demo.get_config_file()
    sliders = {c["props"]["label"]: c["props"]["value"] for c in config["components"] if c["type"] == "slider"}
    chosen = PRESETS[DEFAULT_PRESET]
    assert sliders == {"Temperature": chosen.temperature, "Top-p": chosen.top_p,
                       "Max new tokens": chosen.max_new_tokens, "Repetition penalty": chosen.repetition_penalty,
                       "Beams": chosen.num_beams}
    report = PRESETS["report"]
    temperature, top_p, max_new, penalty, beams, _ = ui_handler(demo, "apply_preset")("report")
    assert (max_new, penalty, beams) == (report.max_new_tokens, report.repetition_penalty, report.num_beams)
    assert temperature["interactive"] is False
    assert app.settings_from("report", 0.5, 0.8, 40, 1.3, 2) == report.updated(
        temperature=0.5, top_p=0.8, max_new_tokens=40, repetition_penalty=1.3, num_beams=2)


def test_retrieved_panel_escapes_text_and_explains_when_empty(app, bot):
    item = RetrievedDialogue(0.9, "sad", XSS, f"{XSS}\nsecond line", "<b>hi</b>", "c1")
    html = app.retrieved_html(Reply(text="x", retrieved=[item]), True, bot, None)
    assert "<img" not in html and "<script" not in html and "<b>hi" not in html and "&lt;b&gt;hi" in html
    no_index = EmpatheticChatbot(bot.chat)
    assert "No retrieval index is loaded" in app.retrieved_html(Reply(text="x"), True, no_index, None)
    assert "Retrieval is off" in app.retrieved_html(Reply(text="x"), False, bot, None)
    assert "safety" in app.retrieved_html(Reply(text="x", kind="crisis"), True, bot, None)


def test_about_lists_models_licence_and_disclaimer(demo, bot, app):
    text = " ".join(str(c["props"].get("value")) for c in demo.get_config_file()["components"]
                    if c["type"] == "markdown")
    for expected in ["CC BY-NC 4.0", "Rashkin", "Towards Empathetic Open-domain Conversation Models",
                     "not a therapist", "988", "findahelpline.com", "emergency number", "tiny-gpt2",
                     "8 dialogues"]:
        assert expected in text, expected
    assert "python eval.py" in text or (app.ASSETS_DIR / "results" / "results.md").exists()


# ---------------------------------------------------------------------------------------------- start-up


def test_space_builds_the_index_in_the_background(app, gpt2_tokenizer, embedder, synthetic_data, tmp_path):
    from conftest import make_tiny_gpt2

    from chatbot.models import wrap_model

    chat = wrap_model(make_tiny_gpt2(gpt2_tokenizer), gpt2_tokenizer, "tiny-gpt2", device="cpu")
    bot = EmpatheticChatbot(chat, embedder=embedder, crisis=CrisisScreen(None), notes=["Retrieval is off: no index"])
    assert app.start_index_build(bot, env={}, index_dir=tmp_path / "index") is None
    build = app.start_index_build(bot, env={"SPACE_ID": "me/chat"}, index_dir=tmp_path / "index",
                                  data_dir=str(synthetic_data))
    assert build is not None and "Building the retrieval index" in app.status_markdown(bot, build)
    build.thread.join(timeout=120)
    assert not build.running and build.error is None and bot.retriever is not None
    assert "Retrieval is off" not in app.status_markdown(bot, build)
    assert bot.respond("My goldfish died", settings=PRESETS["greedy"].updated(max_new_tokens=4)).retrieved


def test_command_line_flags(app, monkeypatch):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "ED_AUTH"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    monkeypatch.setenv("ED_AUTH", "me:secret")
    args = app.parse_args([])
    assert (args.host, args.port, args.auth) == ("0.0.0.0", 7861, "me:secret")
    assert app.parse_args(["--share", "--port", "9000"]).port == 9000
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])


def test_module_level_demo_is_a_queued_blocks(app):
    import gradio as gr

    assert isinstance(app.demo, gr.Blocks) and app.demo.enable_queue
    assert isinstance(app.BOT, EmpatheticChatbot)


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
def guarded_url(app, bot):
    """A second server of the app, allowing the project folder as a careless GRADIO_ALLOWED_PATHS would."""
    with serve(app.build_demo(bot), allowed_paths=[str(PROJECT_ROOT)]) as url:
        yield url


@pytest.mark.parametrize("path", TRAVERSALS)
def test_file_routes_serve_nothing_outside_assets(client, guarded_url, path):
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


def test_launch_binds_locally_blocks_the_project_and_bounds_requests(app, monkeypatch):
    for name in ("GRADIO_SERVER_NAME", "ED_AUTH"):
        monkeypatch.delenv(name, raising=False)
    options = app.launch_kwargs(app.parse_args(["--auth", "me:pass:word"]))
    assert (options["server_name"], options["share"], options["auth"]) == ("127.0.0.1", False, ("me", "pass:word"))
    assert options["max_file_size"] == app.MAX_REQUEST_BYTES
    assert str(PROJECT_ROOT / "app.py") in options["blocked_paths"]
    assert not any(p.startswith(str(app.ASSETS_DIR)) for p in options["blocked_paths"])
    assert app.launch_kwargs(app.parse_args([]))["auth"] is None


def test_oversized_request_is_refused_and_the_server_keeps_serving(app, client):
    url = client.src.rstrip("/") + "/gradio_api/call/respond"
    big = httpx.post(url, json={"data": ["x" * app.MAX_REQUEST_BYTES, [], False]})
    assert big.status_code == 413 and f"{app.MAX_REQUEST_BYTES // 1024} KiB" in big.json()["detail"]
    chunked = httpx.post(url, content=iter([b'{"data": ["' + b"x" * 65536] * 16 + [b'"]}']),
                         headers={"Content-Type": "application/json"})
    assert chunked.status_code >= 400
    assert client.predict("Still there?", [], False, api_name="/respond")[0].strip()


def test_login_is_required_when_auth_is_set(app, bot):
    with serve(app.build_demo(bot), auth=("me", "secret")) as url:
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
def test_real_model_answers_through_the_api(app):
    bot = real_bot()
    with serve(app.build_demo(bot)) as url:
        reply, emotion, retrieved = Client(url, verbose=False).predict(
            "My dog died today. I am so distraught.", [], True, api_name="/respond")
    assert len(reply.split()) >= 3 and retrieved
    if bot.emotion is not None:
        assert emotion in bot.emotion.labels
