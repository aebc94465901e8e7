"""train.py on a tiny random GPT-2: masking, retrieval exclusion, each method end to end, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

import train
from chatbot.contexts import example_contexts
from chatbot.data import load_examples
from chatbot.models import attach_adapter, load_base_model
from chatbot.prompts import PROMPT_FORMAT_VERSION, SYSTEM_INSTRUCTION, encode_example, prepare_tokenizer
from chatbot.retriever import Retriever
from chatbot.scoring import features, pad_batch, reply_loss
from tests.conftest import make_tiny_gpt2


def test_only_reply_tokens_count(gpt2_tokenizer, synthetic_data):
    tok = prepare_tokenizer(gpt2_tokenizer)
    ex = load_examples(synthetic_data, "train")[0]
    enc = encode_example(tok, ex.history, ex.reply)
    reply_ids = [i for i in enc.labels if i != -100]
    assert tok.decode(reply_ids) == " " + ex.reply + tok.eos_token
    assert enc.labels[: len(enc.input_ids) - len(reply_ids)] == [-100] * (len(enc.input_ids) - len(reply_ids))
    assert enc.input_ids[-len(reply_ids):] == reply_ids
    short = encode_example(tok, ex.history[:1], "Ok.")
    batch = pad_batch([features(enc), features(short)], tok.pad_token_id)
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()
    assert batch["input_ids"].shape == batch["labels"].shape


def test_training_never_retrieves_its_own_conversation(synthetic_data, synthetic_index, embedder):
    examples = load_examples(synthetic_data, "train")
    retriever = Retriever(synthetic_index, embedder)
    contexts = example_contexts(examples, embedder, retriever, None, k=3)
    assert all(c.references for c in contexts)
    for ex, c in zip(examples, contexts):
        assert all(ref.conv_id != ex.conv_id for ref in c.references)
    # Train examples reuse the index's stored vectors rather than being embedded again.
    assert all(v is not None for v in retriever.stored_vectors(examples))


def run(tmp_path, tiny_model_dir, synthetic_data, synthetic_index, method, *extra):
    out = tmp_path / method
    code = train.main([
        "--method", method, "--base-model", str(tiny_model_dir), "--data-dir", str(synthetic_data),
        "--index-dir", str(synthetic_index), "--output-dir", str(out), "--max-steps", "2",
        "--per-device-train-batch-size", "2", "--eval-steps", "1", "--save-steps", "1", "--logging-steps", "1",
        "--eval-limit", "2", "--test-limit", "2", "--k", "2", "--max-length", "256", "--use-cpu", *extra,
    ])
    assert code == 0
    return out


def trained_weights_changed(out, tiny_model_dir, method: str, tokenizer) -> bool:
    """Whether training moved the weights from where they started."""
    from safetensors.torch import load_file

    base = load_base_model(str(tiny_model_dir), device="cpu").model
    if method == "full":
        trained = load_base_model(str(out), device="cpu").model.state_dict()
        return any(not torch.equal(value, trained[name]) for name, value in base.state_dict().items())
    saved = load_file(out / "adapter_model.safetensors")
    if method == "lora":  # B starts at zero, so a trained LoRA has a non-zero B
        return any(value.abs().sum() > 0 for name, value in saved.items() if "lora_B" in name)
    # Prompt tuning starts from the embeddings of the instruction's first tokens.
    start = base.get_input_embeddings()(torch.tensor(tokenizer(SYSTEM_INSTRUCTION)["input_ids"][:20]))
    return not torch.allclose(saved["prompt_embeddings"], start)


# Learning rates at which six steps on the synthetic data clearly lower the tiny random model's loss.
FAST_LEARNING_RATES = {"lora": "5e-2", "prompt-tuning": "1e-1", "full": "1e-3"}


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "full"])
def test_training_lowers_the_loss_changes_the_weights_and_saves_a_loadable_model(
        tmp_path, tiny_model_dir, synthetic_data, synthetic_index, gpt2_tokenizer, method):
    out = run(tmp_path, tiny_model_dir, synthetic_data, synthetic_index, method, "--max-steps", "6",
              "--eval-steps", "3", "--save-steps", "3", "--learning-rate", FAST_LEARNING_RATES[method])
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["train_losses"]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    # The same held-out replies in the same prompts, scored before and after training: the loss fell.
    assert metrics["test_perplexity"] < 0.99 * metrics["base_test_perplexity"]
    assert trained_weights_changed(out, tiny_model_dir, method, prepare_tokenizer(gpt2_tokenizer))
    assert {"test_perplexity", "test_word_perplexity", "valid_perplexity", "base_test_perplexity"} <= set(metrics)
    assert (out / "loss.png").exists() and (out / "samples.json").exists()
    meta = json.loads((out / "empathetic_chat.json").read_text())
    assert meta["base_model"] == str(tiny_model_dir) and meta["training_args"]["method"] == method
    assert meta["training_args"]["learning_rate"] == float(FAST_LEARNING_RATES[method])
    assert meta["prompt_format_version"] == PROMPT_FORMAT_VERSION
    if method == "full":
        assert meta["peft_type"] is None and load_base_model(str(out), device="cpu").model is not None
        return
    tuned = attach_adapter(load_base_model(str(tiny_model_dir), device="cpu"), out)
    assert tuned.has_adapter


def test_resume_continues_to_the_same_result(tmp_path, tiny_model_dir, synthetic_data, synthetic_index):
    steps = ["--max-steps", "4", "--eval-steps", "2", "--save-steps", "2"]
    whole = run(tmp_path / "a", tiny_model_dir, synthetic_data, synthetic_index, "lora", *steps)
    # An "interrupted" run: stops after its step-2 checkpoint, then resumes to step 4.
    first = run(tmp_path / "b", tiny_model_dir, synthetic_data, synthetic_index, "lora", *steps,
                "--save-total-limit", "5")
    import shutil

    shutil.rmtree(first / "checkpoint-4")
    resumed = run(tmp_path / "b", tiny_model_dir, synthetic_data, synthetic_index, "lora", *steps,
                  "--resume-from-checkpoint", str(first / "checkpoint-2"))
    from safetensors.torch import load_file

    a = load_file(whole / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_reply_loss_equals_the_models_own_loss_on_each_unpadded_example(gpt2_tokenizer, synthetic_data):
    tok = prepare_tokenizer(gpt2_tokenizer)
    model = make_tiny_gpt2(tok).eval()
    encoded = [encode_example(tok, ex.history, ex.reply) for ex in load_examples(synthetic_data, "train")[:4]]
    with torch.no_grad():
        nll, count = reply_loss(model, pad_batch([features(e) for e in encoded], tok.pad_token_id))
        expected = 0.0
        for e in encoded:
            n = sum(label != -100 for label in e.labels[1:])
            expected += float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss) * n
    assert count == sum(sum(label != -100 for label in e.labels[1:]) for e in encoded)
    assert float(nll) == pytest.approx(expected, rel=1e-4)
