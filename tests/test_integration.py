"""Integration: the real packaged SmolLM2 and MiniLM on the real Empathetic Dialogues data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chatbot.bot import EmpatheticChatbot
from chatbot.data import load_conversations
from chatbot.emotion import accuracy, load_emotion_detector
from chatbot.generation import PRESETS
from chatbot.retriever import Retriever, build_from_data
from chatbot.runtime import PROJECT_ROOT

pytestmark = pytest.mark.integration
REPORT_MESSAGE = "I had such a hard day at work today. Things keep piling up."


@pytest.fixture(scope="module")
def real_index(tmp_path_factory, real_data, embedder):
    """An index over a seeded 1,500-reply slice of the real train split."""
    out = tmp_path_factory.mktemp("real") / "index"
    build_from_data(real_data, out, embedder, limit=1500)
    return out


@pytest.fixture(scope="module")
def real_bot(real_index):
    return EmpatheticChatbot.from_pretrained(index_dir=real_index, device="cpu")


def test_real_reply_is_caring_on_topic_and_not_an_echo(real_bot):
    reply = real_bot.respond(REPORT_MESSAGE, settings=PRESETS["greedy"])
    print(f"\nreply: {reply.text}\nemotion: {reply.emotion}\nretrieved: {[r.response for r in reply.retrieved]}")
    assert reply.kind == "model" and len(reply.text.split()) >= 4
    assert reply.text.strip().lower() != REPORT_MESSAGE.lower()
    assert len(reply.retrieved) >= 3 and reply.emotion is not None
    assert reply.prompt_tokens > 100  # the retrieved examples are in the prompt


def test_a_cached_start_serves_without_pytorch_weights_sentence_transformers_or_peft(real_bot, real_index):
    """What keeps the app's start short: with the exports cached (real_bot built them), a reply on ONNX Runtime
    needs none of them; beam search, which only transformers decodes, loads the weights on first use."""
    code = (
        "import sys; from chatbot.bot import EmpatheticChatbot; from chatbot.generation import PRESETS; "
        f"bot = EmpatheticChatbot.from_pretrained(index_dir={str(real_index)!r}, device='cpu'); "
        "reply = bot.respond('I lost my keys today.', settings=PRESETS['greedy']); "
        "print(reply.engine, bot.chat.loaded, sorted({'peft', 'sentence_transformers'} & set(sys.modules))); "
        "beams = bot.respond('I lost my keys today.', settings=PRESETS['greedy'].updated(num_beams=2, max_new_tokens=8)); "
        "print(beams.engine, bot.chat.loaded, bool(beams.text))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["onnxruntime False []", "transformers True True"]


def test_real_retrieval_excludes_and_matches_exact_search(real_index, embedder):
    import numpy as np

    from chatbot.data import SPEAKER, Turn
    from chatbot.embeddings import embed

    retriever = Retriever(real_index, embedder)
    keys = embed(embedder, [r["context"] for r in retriever.records])
    hits = retriever.search([Turn(SPEAKER, REPORT_MESSAGE)], k=5)
    exact = np.argsort(-(keys @ embed(embedder, [REPORT_MESSAGE])[0]))[:5]
    assert [h.response for h in hits] == [retriever.records[i]["response"] for i in exact]


def test_emotion_accuracy_on_the_test_split(embedder, real_data):
    detector = load_emotion_detector(embedder)
    assert detector is not None, "assets/emotion is missing: python train_emotion.py"
    test = [c for c in load_conversations(real_data, "test") if c.emotion]
    acc = accuracy(detector, [c.turns[0].text for c in test], [c.emotion for c in test])
    print(f"\nemotion accuracy, test split, first speaker turn -> gold label ({len(test)} conversations): {acc:.1%}")
    assert acc >= 0.45


def test_cli_json(real_index):
    env = {**os.environ, "ED_INDEX_DIR": str(real_index)}
    out = subprocess.run(
        [sys.executable, "-m", "chatbot", REPORT_MESSAGE, "--json", "--preset", "greedy"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert set(result) >= {"reply", "emotion", "retrieved", "crisis"}
    assert result["reply"] and result["emotion"]["label"] and len(result["retrieved"]) >= 3
    assert set(result["retrieved"][0]) == {"score", "emotion", "situation", "context", "response", "conv_id"}


def test_cli_errors_cleanly_on_unknown_adapter():
    out = subprocess.run(
        [sys.executable, "-m", "chatbot", "hi", "--json", "--adapter", "/no/such/adapter"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_shipped_prompt_tuning_adapter_replies_as_an_uncached_decode_does(real_index):
    """The report's method, shipped: its replies keep the virtual tokens (peft's cached generate turned them to noise)."""
    from tests.conftest import uncached_greedy_reply

    adapter = PROJECT_ROOT / "assets" / "adapters" / "prompt-tuning-rag"
    bot = EmpatheticChatbot.from_pretrained(adapter=adapter, index_dir=real_index, device="cpu")
    settings = PRESETS["greedy"].updated(repetition_penalty=1.0, max_sentences=0, max_new_tokens=24)
    reply = bot.respond(REPORT_MESSAGE, settings=settings, system="tuned+rag")  # one generated reply, no selection
    prompt = bot.prompt_for(REPORT_MESSAGE, [], reply.retrieved, reply.emotion.label)
    print(f"\nprompt-tuning reply: {reply.text}")
    assert reply.kind == "model"
    assert reply.text == uncached_greedy_reply(bot.chat, prompt.text, settings)
    assert len(reply.text.split()) >= 4
