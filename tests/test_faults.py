"""Faults the app survives: a missing or broken index, a killed index build, a missing or unfit adapter, and the
model failing halfway through a reply. Each time the bot starts (or keeps going), chats, and says what is off.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from app_server import chat, serve, tiny_bot
from cli_runner import read_output, save_adapter_for, save_tiny_model, snapshot, start_cli
from conftest import SYNTHETIC, write_split
from gradio_client import Client

from chatbot import embeddings
from chatbot.bot import ERROR_REPLY, EmpatheticChatbot
from chatbot.data import SPEAKER, Turn, load_examples
from chatbot.generation import PRESETS
from chatbot.models import ADAPTER_META_FILE
from chatbot.retriever import Retriever, build_index, recover_interrupted_build
from chatbot.safety import CrisisScreen
from chatbot.web import build_demo
from chatbot.web.render import retrieved_html

GREEDY = PRESETS["greedy"].updated(max_new_tokens=8)
DEAD_PID = 99_999_999  # above any Linux pid_max: never a live process


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    return save_tiny_model(gpt2_tokenizer, tmp_path_factory.mktemp("faults") / "model")


@pytest.fixture(scope="module")
def good_index(tmp_path_factory, synthetic_data, embedder) -> Path:
    out = tmp_path_factory.mktemp("faults-index") / "index"
    build_index(load_examples(synthetic_data, "train"), embedder, out, "synthetic")
    return out


@pytest.fixture(scope="module")
def crisis(embedder) -> CrisisScreen:
    return CrisisScreen(embedder)


def load_bot(model_dir: Path, index_dir: Path, embedder, crisis: CrisisScreen, monkeypatch,
             adapter: str = "none") -> EmpatheticChatbot:
    """The bot as app.py loads it (from_pretrained), on the tiny model, sharing the embedder and crisis screen."""
    monkeypatch.setattr("chatbot.bot.load_embedder", lambda device=None: embedder)
    monkeypatch.setattr("chatbot.bot.CrisisScreen", lambda _: crisis)  # embedding its exemplars takes a while
    return EmpatheticChatbot.from_pretrained(str(model_dir), adapter, index_dir, device="cpu")


def shown_status(bot: EmpatheticChatbot) -> str:
    """The start-up notes as the page shows them (the status Markdown above the tabs)."""
    config = build_demo(bot).get_config_file()
    status = [c["props"] for c in config["components"] if "ed-status" in (c["props"].get("elem_classes") or [])]
    assert status and status[0]["visible"], "no visible status notes"
    return status[0]["value"]


# ---------------------------------------------------------------------------------------------- the index


def break_index(good: Path, folder: Path, how: str) -> Path:
    """A copy of a good index, broken as `how` says."""
    if how == "missing":
        return folder / "no-index-here"
    index = folder / "index"
    shutil.copytree(good, index)
    manifest = json.loads((index / "manifest.json").read_text())
    if how == "corrupt vectors":
        (index / "index.faiss").write_bytes(b"not a faiss index")
    elif how == "truncated records":
        lines = (index / "records.jsonl").read_text().splitlines()
        (index / "records.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    elif how == "corrupt manifest":
        (index / "manifest.json").write_text("{ half a manifest")
    elif how == "another embedder":
        (index / "manifest.json").write_text(json.dumps({**manifest, "embedder": "some/other-embedder", "dim": 768}))
    return index


@pytest.mark.parametrize(("how", "says"), [
    ("missing", "No index at"),
    ("corrupt vectors", "Corrupt index"),
    ("truncated records", "Corrupt index"),
    ("corrupt manifest", "Corrupt index manifest"),
    ("another embedder", "embedder 'some/other-embedder' != 'sentence-transformers/all-MiniLM-L6-v2'"),
])
def test_broken_index_means_chat_without_retrieval_and_the_page_says_so(
        how, says, good_index, model_dir, embedder, crisis, tmp_path, monkeypatch):
    bot = load_bot(model_dir, break_index(good_index, tmp_path, how), embedder, crisis, monkeypatch)
    assert bot.retriever is None
    assert any(note.startswith("Retrieval is off") and says in note for note in bot.notes), bot.notes
    assert says in shown_status(bot).replace("\\_", "_")
    reply = bot.respond("My goldfish died this morning.", settings=GREEDY)
    assert reply.kind in {"model", "fallback"} and reply.text and reply.retrieved == []
    assert "No retrieval index is loaded" in retrieved_html(reply, True, bot, None)


def big_data_set(folder: Path, copies: int) -> Path:
    """The synthetic conversations repeated with numbered variations: thousands of replies to embed."""
    folder.mkdir()
    for split, conversations in SYNTHETIC.items():
        many = [(emotion, f"{situation} {n}", [f"{turn} (day {n})" for turn in turns])
                for n in range(copies if split == "train" else 1) for emotion, situation, turns in conversations]
        write_split(folder / f"{split}.csv", many)
    return folder


def test_build_index_killed_while_embedding_leaves_the_old_index_intact(good_index, embedder, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(good_index, index)
    before = snapshot(index)
    data = big_data_set(tmp_path / "big", copies=500)  # 4,500 replies: tens of seconds of embedding
    run = tmp_path / "run"
    process = start_cli("build_index.py", ["--data-dir", str(data), "--index-dir", str(index), "--batch-size", "8"],
                        run)
    deadline = time.monotonic() + 600
    # Kill once the progress bar shows a batch or more embedded, and the end is not near.
    while not re.search(r"Batches:\s+\d+%\|[^|]*\|\s*([1-9]\d*)/", read_output(run, "stderr")):
        assert process.is_alive(), read_output(run, "stderr")[-2000:]
        assert time.monotonic() < deadline, "build_index.py never started embedding"
        time.sleep(0.2)
    process.kill()  # SIGKILL: no clean-up code runs
    process.join()
    assert process.exitcode == -9
    assert "Indexed" not in read_output(run, "stderr")  # it really died mid-way
    assert snapshot(index) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "index", "run"]  # no half-written sibling
    hits = Retriever(index, embedder).search([Turn(SPEAKER, "my goldfish died")], k=2)
    assert len(hits) == 2


def test_build_that_fails_while_writing_leaves_the_old_index_and_no_debris(good_index, synthetic_data, embedder,
                                                                           tmp_path, monkeypatch):
    index = tmp_path / "index"
    shutil.copytree(good_index, index)
    before = snapshot(index)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("chatbot.retriever.faiss.write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_index(load_examples(synthetic_data, "train")[:3], embedder, index, "second")
    assert snapshot(index) == before and [p.name for p in tmp_path.iterdir()] == ["index"]
    assert len(Retriever(index, embedder)) == json.loads((index / "manifest.json").read_text())["count"]


def test_next_build_recovers_what_a_killed_one_left(good_index, embedder, tmp_path):
    index = tmp_path / "index"
    # Killed between moving the old index aside and moving the new one in: the old one comes back.
    shutil.copytree(good_index, tmp_path / f".index.old-{DEAD_PID}")
    shutil.copytree(good_index, tmp_path / f".index.tmp-{DEAD_PID}")
    (tmp_path / ".index.tmp-1").mkdir()  # pid 1 is alive: a build still running is left alone
    recover_interrupted_build(index)
    assert snapshot(index) == snapshot(good_index) and len(Retriever(index, embedder)) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.tmp-1", "index"]


# ---------------------------------------------------------------------------------------------- the adapter


def adapter_for(kind: str, folder: Path, tokenizer) -> Path | None:
    """What default_adapter() finds: nothing, a folder that went away, another model's adapter, broken metadata."""
    if kind == "none":
        return None
    if kind == "missing":
        return folder / "gone"
    path = save_adapter_for(tokenizer, folder / "adapter", "gpt2")
    if kind == "corrupt":
        (path / ADAPTER_META_FILE).write_text("{ broken")
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("none", "No tuned adapter loaded"),
    ("missing", "does not exist"),
    ("another base model", "was trained on base model 'gpt2'"),
    ("corrupt", "Corrupt adapter metadata"),
])
def test_unfit_adapter_means_the_base_model_runs_and_the_page_says_so(
        kind, says, model_dir, good_index, embedder, crisis, gpt2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("chatbot.models.default_adapter", lambda: adapter_for(kind, tmp_path, gpt2_tokenizer))
    bot = load_bot(model_dir, good_index, embedder, crisis, monkeypatch, adapter="default")
    assert not bot.chat.has_adapter and bot.retriever is not None
    assert any(says in note for note in bot.notes), bot.notes
    assert "use the base model" in shown_status(bot)
    reply = bot.respond("I passed my driving test!", settings=GREEDY, system="tuned+rag")
    assert reply.kind in {"model", "fallback"} and reply.text and reply.retrieved


# ---------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory):
    return tiny_bot(gpt2_tokenizer, embedder, synthetic_data, tmp_path_factory.mktemp("faults-bot") / "index")


def fail_mid_stream(bot: EmpatheticChatbot, monkeypatch, good_steps: int = 6) -> None:
    """Let the model run a few forward passes (a few tokens of a reply), then raise as out-of-memory would."""
    model = bot.chat.model  # the model that writes replies (tiny GPT-2: transformers engine)
    forward, calls = model.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > good_steps:
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)


def test_model_failing_mid_stream_gives_an_apology_and_the_next_reply_works(bot, monkeypatch):
    demo = build_demo(bot)
    fail_mid_stream(bot, monkeypatch)
    outputs = chat(demo, "My goldfish died this morning.", preset="greedy", max_new_tokens=GREEDY.max_new_tokens)
    shown = [o["chatbot"][-1]["content"] for o in outputs[1:]]
    assert any(text and text != ERROR_REPLY for text in shown[:-1])  # part of a reply was on screen...
    assert shown[-1] == ERROR_REPLY  # ...then the apology replaced it
    assert "Something went wrong" in outputs[-1]["notes"]
    monkeypatch.undo()
    last = chat(demo, "Thank you for listening.", outputs[-1]["state"], preset="greedy",
                max_new_tokens=GREEDY.max_new_tokens)[-1]
    assert last["chatbot"][-1]["content"] not in ("", ERROR_REPLY) and len(last["state"]) == 4


def test_model_failing_mid_stream_through_the_api(bot, monkeypatch):
    with serve(build_demo(bot)) as url:
        client = Client(url, verbose=False)
        fail_mid_stream(bot, monkeypatch)
        assert client.predict("My goldfish died.", [], True, api_name="/respond")[0] == ERROR_REPLY
        assert client.predict("My goldfish died.", "base", "tuned", api_name="/compare") == (ERROR_REPLY, ERROR_REPLY)
        monkeypatch.undo()
        reply, emotion, retrieved = client.predict("My goldfish died.", [], True, api_name="/respond")
    assert reply not in ("", ERROR_REPLY) and emotion and retrieved


# ---------------------------------------------------------------------------------------------- before generation


def test_embedder_failing_still_screens_for_crisis_and_replies_without_retrieval(bot, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("embedding failed (simulated)")

    assert embeddings.embedder_engine(bot.embedder) == embeddings.embedder_engine(bot.crisis.embedder) == "onnxruntime"
    monkeypatch.setattr(embeddings.OnnxEncoder, "__call__", failing)  # the shared embedder and the screen's copy
    crisis = bot.respond("I want to kill myself tonight.", settings=GREEDY)
    assert crisis.kind == "crisis"  # the patterns still screen without the embedder
    reply = bot.respond("My goldfish died this morning.", settings=GREEDY)
    assert reply.kind in {"model", "fallback"} and reply.text and not reply.retrieved and reply.emotion is None
    assert any("retrieval failed" in note for note in reply.notes)
    monkeypatch.undo()
    assert bot.respond("My goldfish died this morning.", settings=GREEDY).retrieved


def test_prompt_building_failing_gives_an_apology_through_the_api_and_the_app_keeps_serving(bot,
                                                                                          monkeypatch):
    with serve(build_demo(bot)) as url:
        client = Client(url, verbose=False)

        def failing(*args, **kwargs):
            raise ValueError("tokenizer failed (simulated)")

        monkeypatch.setattr(bot, "prompt_for", failing)
        assert client.predict("My goldfish died.", [], True, api_name="/respond")[0] == ERROR_REPLY
        assert client.predict("My goldfish died.", "base", "tuned", api_name="/compare") == (ERROR_REPLY, ERROR_REPLY)
        monkeypatch.undo()
        reply, emotion, retrieved = client.predict("My goldfish died.", [], True, api_name="/respond")
    assert reply not in ("", ERROR_REPLY) and emotion and retrieved
