"""The facade on a tiny random GPT-2: streaming partials, special replies, adapters, systems, failures."""

from __future__ import annotations

import json
import shutil

import pytest
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from chatbot.bot import EMPTY_MESSAGE_REPLY, ERROR_REPLY, MAX_MESSAGE_CHARS, EmpatheticChatbot
from chatbot.generation import PRESETS, GenerationSettings, preset
from chatbot.models import HUB_IDS, ModelLoadError, attach_adapter, save_adapter
from chatbot.safety import CRISIS_REPLY, CrisisScreen
from chatbot.systems import SYSTEMS, get_system
from tests.conftest import random_adapter

GREEDY = PRESETS["greedy"].updated(max_new_tokens=8)


def test_stream_yields_growing_text_ending_with_the_full_reply(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    partials = list(bot.stream("I lost my keys today.", settings=GREEDY, use_retrieval=False))
    texts = [p.text for p in partials]
    assert len(texts) >= 2
    assert all(b.startswith(a) or not a for a, b in zip(texts[:-1], texts[1:]))
    assert [p.done for p in partials][-1] is True and not any(p.done for p in partials[:-1])
    assert bot.respond("I lost my keys today.", settings=GREEDY, use_retrieval=False).text == texts[-1]


def test_greedy_is_deterministic_and_sampling_is_seeded(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    assert bot.respond("hi", settings=GREEDY).text == bot.respond("hi", settings=GREEDY).text
    sampled = PRESETS["sampling"].updated(max_new_tokens=8, seed=7)
    assert bot.respond("hi", settings=sampled).text == bot.respond("hi", settings=sampled).text


def test_empty_message_makes_no_model_call(tiny_chat, monkeypatch):
    bot = EmpatheticChatbot(tiny_chat)
    monkeypatch.setattr(bot, "_generate", lambda *a, **k: pytest.fail("model called"))
    for message in ["", "   \n\t ", "\x00\x07"]:
        reply = bot.respond(message)
        assert reply.kind == "empty" and reply.text == EMPTY_MESSAGE_REPLY


def test_crisis_reply_never_reaches_the_model(tiny_chat, monkeypatch):
    bot = EmpatheticChatbot(tiny_chat, crisis=CrisisScreen(None))
    monkeypatch.setattr(bot, "_generate", lambda *a, **k: pytest.fail("model called"))
    reply = bot.respond("I want to kill myself")
    assert reply.crisis and reply.text == CRISIS_REPLY and reply.to_dict()["crisis"] is True


def test_long_message_is_truncated_and_says_so(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    reply = bot.respond("word " * 20_000, settings=GREEDY)
    assert reply.truncated_input and any(str(MAX_MESSAGE_CHARS) in n for n in reply.notes)
    assert reply.prompt_tokens < 1000


def test_generation_error_gives_an_apology(tiny_chat, monkeypatch):
    bot = EmpatheticChatbot(tiny_chat)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_chat.model, "forward", broken)  # both the fast loop and `generate` call it
    reply = bot.respond("hello there", settings=GREEDY)
    assert reply.kind == "error" and reply.text == ERROR_REPLY
    assert bot.respond("hello there", settings=preset("report").updated(max_new_tokens=4)).kind == "error"
    monkeypatch.undo()
    assert bot.respond("hello again", settings=GREEDY).kind in {"model", "fallback"}


def test_history_as_ui_messages(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    history = [{"role": "user", "content": "My cat is sick."}, {"role": "assistant", "content": "Oh no."}]
    reply = bot.respond("She is at the vet now.", history=history, settings=GREEDY)
    assert reply.prompt_tokens > bot.respond("She is at the vet now.", settings=GREEDY).prompt_tokens


def test_settings_presets_and_validation():
    report = preset("report")
    assert (report.num_beams, report.no_repeat_ngram_size, report.max_new_tokens) == (3, 2, 100)
    assert report.generate_kwargs()["early_stopping"] is True
    assert GenerationSettings().generate_kwargs()["do_sample"] is True
    with pytest.raises(ValueError, match="Unknown generation setting"):
        GenerationSettings().updated(temprature=1.0)
    with pytest.raises(ValueError, match="Unknown preset"):
        preset("fast")
    tuned_rag = get_system("tuned+rag")
    assert (tuned_rag.adapter, tuned_rag.retrieval, tuned_rag.select) == (True, True, False)
    assert [(s.adapter, s.retrieval, s.select) for s in SYSTEMS.values()] == [
        (False, False, False), (False, True, False), (True, False, False), (True, True, False), (True, True, True)]
    with pytest.raises(ValueError, match="Unknown system 'gpt5'; choose one of: base, base"):
        get_system("gpt5")


def test_beam_search_report_preset_runs(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    reply = bot.respond("My dog died today.", settings=preset("report").updated(max_new_tokens=6))
    assert reply.done and reply.kind in {"model", "fallback"}


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_adapter_round_trip_and_base_switch(tiny_chat, gpt2_tokenizer, tmp_path, kind):
    from chatbot.models import wrap_model
    from tests.conftest import make_tiny_gpt2

    config = (
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
        if kind == "lora"
        else PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    peft_model = random_adapter(make_tiny_gpt2(gpt2_tokenizer), config)  # loading it visibly changes the output
    save_adapter(peft_model, gpt2_tokenizer, tmp_path / "adapter", "tiny-gpt2", {"method": kind}, {"x": 1})

    tuned = attach_adapter(tiny_chat, tmp_path / "adapter")
    assert tuned.has_adapter and tuned.adapter_meta["training_args"] == {"method": kind}
    bot = EmpatheticChatbot(tuned)
    base_bot = EmpatheticChatbot(wrap_model(make_tiny_gpt2(gpt2_tokenizer), gpt2_tokenizer, "tiny-gpt2", "cpu"))
    settings = GREEDY.updated(max_new_tokens=6)
    base_text = base_bot.respond("hello", settings=settings).text
    assert bot.respond("hello", settings=settings, system="base").text == base_text
    assert bot.respond("hello", settings=settings, system="tuned").text != base_text

    with pytest.raises(ModelLoadError, match="trained on base model"):
        attach_adapter(wrap_model(make_tiny_gpt2(gpt2_tokenizer), gpt2_tokenizer, "gpt2", "cpu"), tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="does not exist"):
        attach_adapter(tiny_chat, tmp_path / "missing")


def test_a_lazy_chat_model_reads_its_weights_on_first_use_and_checks_its_adapter_at_once(
        tiny_model_dir, gpt2_tokenizer, tmp_path, monkeypatch):
    """`load_chat_model(lazy=True)`: tokenizer, config, end ids and adapter checks now, the weights on first use."""
    from transformers import AutoModelForCausalLM

    from chatbot.engine import stop_token_ids
    from chatbot.models import load_chat_model
    from tests.conftest import make_tiny_gpt2

    name = str(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    save_adapter(random_adapter(make_tiny_gpt2(gpt2_tokenizer), lora), gpt2_tokenizer, tmp_path / "lora", name)
    save_adapter(random_adapter(make_tiny_gpt2(gpt2_tokenizer), PromptTuningConfig(num_virtual_tokens=4,
                 task_type="CAUSAL_LM")), gpt2_tokenizer, tmp_path / "prompt", name)
    eager = load_chat_model(name, tmp_path / "lora", "cpu")
    loads = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))

    lazy = load_chat_model(name, tmp_path / "lora", "cpu", lazy=True)
    assert not lazy.loaded and loads == []
    assert lazy.has_adapter and not lazy.prompt_learning
    assert lazy.config.to_dict() == eager.config.to_dict() and stop_token_ids(lazy) == stop_token_ids(eager)
    assert load_chat_model(name, tmp_path / "prompt", "cpu", lazy=True).prompt_learning
    assert loads == []
    settings = GREEDY.updated(max_new_tokens=6)
    for system in ("base", "tuned"):
        expected = EmpatheticChatbot(eager).respond("hello", settings=settings, system=system).text
        assert EmpatheticChatbot(lazy).respond("hello", settings=settings, system=system).text == expected
    assert lazy.loaded and len(loads) == 1  # once, for both replies
    other = shutil.copytree(tiny_model_dir, tmp_path / "another-base")  # the same files under another name
    with pytest.raises(ModelLoadError, match="trained on base model"):
        load_chat_model(str(other), tmp_path / "lora", "cpu", lazy=True)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_chat_model(name, tmp_path / "missing", "cpu", lazy=True)


def test_a_save_that_fails_leaves_the_previous_adapter_loadable(tiny_chat, gpt2_tokenizer, tmp_path, monkeypatch):
    from tests.conftest import make_tiny_gpt2

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    out = tmp_path / "adapter"
    save_adapter(get_peft_model(make_tiny_gpt2(gpt2_tokenizer), config), gpt2_tokenizer, out, "tiny-gpt2",
                 {"run": 1})
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(type(gpt2_tokenizer), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(get_peft_model(make_tiny_gpt2(gpt2_tokenizer, seed=1), config), gpt2_tokenizer, out,
                     "tiny-gpt2", {"run": 2})
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # no staging debris, nothing half-written
    assert attach_adapter(tiny_chat, out).adapter_meta["training_args"] == {"run": 1}


def test_a_saved_adapter_names_the_hub_id_and_leaves_the_live_config_alone(gpt2_tokenizer, tmp_path):
    from tests.conftest import make_tiny_gpt2

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_tiny_gpt2(gpt2_tokenizer), config)
    peft_model.peft_config["default"].base_model_name_or_path = "/home/me/.cache/gpt2"
    save_adapter(peft_model, gpt2_tokenizer, tmp_path / "adapter", "gpt2")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == HUB_IDS["gpt2"]
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"base_model: {HUB_IDS['gpt2']}" in card and f"base_model:adapter:{HUB_IDS['gpt2']}" in card
    assert peft_model.peft_config["default"].base_model_name_or_path == "/home/me/.cache/gpt2"

    prompt_tuning = get_peft_model(make_tiny_gpt2(gpt2_tokenizer), PromptTuningConfig(
        num_virtual_tokens=2, task_type="CAUSAL_LM", tokenizer_name_or_path="/home/me/.cache/gpt2"))
    save_adapter(prompt_tuning, gpt2_tokenizer, tmp_path / "prompt", "gpt2")
    saved = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert saved["tokenizer_name_or_path"] == saved["base_model_name_or_path"] == HUB_IDS["gpt2"]
    assert prompt_tuning.peft_config["default"].tokenizer_name_or_path == "/home/me/.cache/gpt2"


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_prompt_tuning_replies_keep_the_virtual_tokens_while_decoding(architecture, gpt2_tokenizer, tmp_path):
    """peft's cached `generate` loses the virtual tokens after one step; the bot must match an uncached decode."""
    from chatbot.models import wrap_model
    from chatbot.prompts import build_prompt
    from tests.conftest import make_tiny_gpt2, make_tiny_llama, uncached_greedy_reply

    make = make_tiny_gpt2 if architecture == "gpt2" else make_tiny_llama
    name = f"tiny-{architecture}"
    peft_model = random_adapter(make(gpt2_tokenizer), PromptTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM"))
    save_adapter(peft_model, gpt2_tokenizer, tmp_path / "adapter", name)
    tuned = attach_adapter(wrap_model(make(gpt2_tokenizer), gpt2_tokenizer, name, "cpu"), tmp_path / "adapter")
    settings = GREEDY.updated(repetition_penalty=1.0, max_sentences=0, max_new_tokens=24)
    expected = uncached_greedy_reply(tuned, build_prompt(gpt2_tokenizer, "hello").text, settings)
    reply = EmpatheticChatbot(tuned).respond("hello", settings=settings, system="tuned")
    assert reply.text == expected and reply.text


class FakeSelector:
    """Scores candidates by a fixed table (unknown texts score 0), and records what it was asked to rank."""

    def __init__(self, scores: dict[str, float]):
        self.scores, self.seen = scores, []

    def score(self, context: str, candidates: list[str], known: dict | None = None) -> list[float]:
        self.seen.append(list(candidates))
        return [self.scores.get(text, 0.0) for text in candidates]


def test_selection_shows_the_best_fit_candidate_and_never_a_rejected_one(tiny_chat, monkeypatch):
    from chatbot.retriever import RetrievedDialogue

    person = "That is terrible, I am so sorry. Was it sudden?"
    unsafe = "Nobody would miss you."
    selector = FakeSelector({unsafe: 9.0, person: 5.0})
    bot = EmpatheticChatbot(tiny_chat, selector=selector)
    assert bot.default_system(True) == "tuned+rag+select" and bot.default_system(False) == "tuned"
    retrieved = [RetrievedDialogue(0.9, "sad", "My cat died.", "My cat died.", person, "hit:1_conv:2")]
    monkeypatch.setattr(bot, "analyse", lambda *a, **k: (None, retrieved))
    monkeypatch.setattr(bot, "_generate", lambda prompts, settings, adapters, counts: iter(
        [[["I see. Tell me more.", unsafe, "ok", "I see. Tell me more."][:n] for n in counts]]))
    reply = bot.respond("My dog died today.", settings=PRESETS["chat"])
    assert reply.system == "tuned+rag+select" and reply.text == person and reply.from_dataset
    sources = [(c.source, c.rejected is None) for c in reply.candidates]
    assert sources == [("generated", True), ("generated", False), ("generated", False), ("generated", True),
                       ("retrieved", True)]  # the unsafe and the one-word candidates were never ranked
    assert unsafe not in selector.seen[0] and "ok" not in selector.seen[0]
    data = json.loads(json.dumps(reply.to_dict()))
    assert data["candidates"][data["chosen"]] == {"text": person, "source": "retrieved", "score": 5.0,
                                                   "conv_id": "hit:1_conv:2", "situation": "My cat died.",
                                                   "rejected": None}
    plain = bot.respond("My dog died today.", settings=PRESETS["chat"], system="tuned+rag")
    assert plain.text == "I see. Tell me more." and not plain.from_dataset and len(plain.candidates) == 1


def test_selection_embeds_only_the_generated_candidates(tiny_chat, synthetic_index, embedder, monkeypatch, tmp_path):
    """Retrieved replies are scored with the selector's cached vectors of the index, not embedded again."""

    import chatbot.selector as selector_module
    from chatbot.retriever import Retriever
    from chatbot.selector import ResponseSelector

    bot = EmpatheticChatbot(tiny_chat, Retriever(synthetic_index, embedder),
                            selector=ResponseSelector(embedder))
    generated = "I see. Tell me more about it."
    monkeypatch.setattr(bot, "_generate", lambda prompts, settings, adapters, counts: iter(
        [[[generated] * n for n in counts]]))
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    bot.selector.index_vectors(bot.retriever)  # as from_pretrained does at start-up
    embedded, real = [], selector_module.embed
    monkeypatch.setattr(selector_module, "embed", lambda model, texts: embedded.extend(texts) or real(model, texts))
    reply = bot.respond("My goldfish died this morning.", settings=PRESETS["chat"])
    assert reply.retrieved and all(c.score is not None for c in reply.candidates)
    assert embedded[1:] == [generated]  # the dialogue, then the one distinct generated text
