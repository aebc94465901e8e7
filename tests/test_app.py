"""The Gradio app: its API through gradio_client, its page handlers, the Space index build and the CLI flags.

Most tests serve `app.build_demo` on a tiny random GPT-2 (fast); one integration test serves the real model.
Importing `app` loads the real model once, as a Space does.
"""

from __future__ import annotations

import csv
import time

import pytest
from app_server import real_bot, serve, tiny_bot
from gradio_client import Client
from gradio_client.exceptions import AppError

from chatbot.bot import EMPTY_MESSAGE_REPLY, MAX_MESSAGE_CHARS, EmpatheticChatbot, Reply
from chatbot.generation import DEFAULT_PRESET, PRESETS
from chatbot.retriever import RetrievedDialogue
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


@pytest.mark.parametrize(("endpoint", "args", "expected"), [
    ("/compare", ("hi", "gpt-5", "base"), "Unknown left system 'gpt-5'; choose one of: base, base+rag"),
    ("/compare", ("hi", "base", 3), "Unknown right system 3"),
    ("/compare", (["hi"], "base", "tuned"), "message must be a string"),
    ("/respond", (42, [], True), "message must be a string, not int"),
    ("/respond", ("hi", "not a list", True), "history must be a list"),
    ("/respond", ("hi", [{"role": "system", "content": "x"}], True), "history[0] must be a dict with role"),
    ("/respond", ("hi", [{"role": "user", "content": 7}], True), "string content"),
    ("/respond", ("hi", [], "yes"), "use_retrieval must be true or false"),
])
def test_bad_input_gives_a_clear_error_and_the_server_keeps_serving(client, endpoint, args, expected):
    with pytest.raises(AppError) as err:
        client.predict(*args, api_name=endpoint)
    assert expected in str(err.value)
    assert client.predict("Still there?", [], False, api_name="/respond")[0].strip()


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


def test_html_and_script_come_back_as_plain_text(client):
    history = [{"role": "user", "content": XSS}, {"role": "assistant", "content": XSS}]
    reply, emotion, retrieved = client.predict(XSS, history, True, api_name="/respond")
    assert isinstance(reply, str) and isinstance(emotion, str) and isinstance(retrieved, list)
    assert all(isinstance(s, str) for s in client.predict(XSS, "base", "base+rag", api_name="/compare"))


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
    assert any(o[1] == "" and o[0] for o in outputs)  # the right side waits while the left one streams
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


@pytest.mark.integration
def test_real_model_answers_through_the_api(app):
    bot = real_bot()
    with serve(app.build_demo(bot)) as url:
        reply, emotion, retrieved = Client(url, verbose=False).predict(
            "My dog died today. I am so distraught.", [], True, api_name="/respond")
    assert len(reply.split()) >= 3 and retrieved
    if bot.emotion is not None:
        assert emotion in bot.emotion.labels
