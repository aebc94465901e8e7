"""Fine-tune a causal LM on Empathetic Dialogues (prompt tuning, LoRA or full), optionally retrieval-augmented.

Single process: `python train.py --method lora --limit 5000`.
Several GPUs, no code change: `accelerate launch train.py ...` or `torchrun --nproc_per_node N train.py ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from chatbot.bot import DEFAULT_K, EmpatheticChatbot
from chatbot.contexts import example_contexts
from chatbot.data import DataError, Example, load_examples
from chatbot.embeddings import load_embedder
from chatbot.emotion import load_emotion_detector
from chatbot.generation import PRESETS
from chatbot.models import DEFAULT_BASE_MODEL, ModelLoadError, load_base_model, resolve_base_model, save_adapter
from chatbot.prompts import DEFAULT_MAX_PROMPT_TOKENS, SYSTEM_INSTRUCTION, EncodedExample, encode_example
from chatbot.retriever import IndexLoadError, Retriever
from chatbot.runtime import DEFAULT_SEED, default_index_dir, get_device, set_seed
from chatbot.scoring import features, pad_batch, perplexity, reply_loss

logger = logging.getLogger("train")
METHODS = ("prompt-tuning", "lora", "full")
# LoRA targets per architecture: attention projections (GPT-2 fuses q,k,v in a Conv1D, hence fan_in_fan_out).
LORA_TARGETS = {"llama": (["q_proj", "k_proj", "v_proj", "o_proj"], False), "gpt2": (["c_attn"], True)}
SAMPLE_PROMPTS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (every one documented in --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="lora", help="what to train (prompt tuning is the report's method)")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL,
                   help="smollm2-135m-instruct (packaged), gpt2, distilgpt2, a hub id or a local folder")
    p.add_argument("--data-dir", default=None, help="folder with train/valid/test.csv (default: $ED_DATA_DIR, data/, download)")
    p.add_argument("--index-dir", default=None, help="train-split retrieval index (default: $ED_INDEX_DIR or data/index/)")
    p.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True,
                   help="put each example's top-k train neighbours (never its own conversation) in its prompt")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="retrieved dialogues per prompt (as at inference)")
    p.add_argument("--emotion", action=argparse.BooleanOptionalAction, default=True,
                   help="put the detected emotion in each prompt (as at inference)")
    p.add_argument("--output-dir", required=True, help="where the adapter (or full model), metrics and plots go")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4 LoRA, 3e-2 prompt tuning, 2e-5 full)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_PROMPT_TOKENS, help="tokens per example (prompt + reply)")
    p.add_argument("--limit", type=int, default=0, help="train on a seeded random subset of N examples (0 = all)")
    p.add_argument("--eval-limit", type=int, default=200, help="valid examples evaluated during training")
    p.add_argument("--test-limit", type=int, default=300, help="test examples for the final perplexity (0 = all)")
    p.add_argument("--eval-steps", type=int, default=200, help="evaluate and checkpoint every N optimizer steps")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--save-limit", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt tuning: virtual tokens")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--lora-layers", type=int, default=0,
                   help="adapt only the top N transformer layers (0 = all); backpropagation stops at the lowest "
                        "adapted layer, so fewer layers train faster (about 1.6x with 10 of SmolLM2's 30 on CPU)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for sampling, initialisation and shuffling")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    args = p.parse_args(argv)
    for flag in ("limit", "eval_limit", "test_limit"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be 0 (all) or a positive number")
    for flag in ("batch_size", "grad_accum", "eval_steps", "k", "save_limit"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        p.error(f"--output-dir {args.output_dir} is a file, not a folder")
    return args


def peft_config(method: str, model_type: str, num_layers: int, args: argparse.Namespace, tokenizer_path: str):
    """The peft configuration for a method and architecture (None for full fine-tuning)."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    if method == "lora":
        targets, fan_in_fan_out = LORA_TARGETS.get(model_type, LORA_TARGETS["llama"])
        top = list(range(num_layers - args.lora_layers, num_layers)) if 0 < args.lora_layers < num_layers else None
        return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules=targets,
                          fan_in_fan_out=fan_in_fan_out, layers_to_transform=top, task_type="CAUSAL_LM")
    if method == "prompt-tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=SYSTEM_INSTRUCTION,
                                  tokenizer_name_or_path=tokenizer_path)
    return None


def encode_all(chat, examples: list[Example], contexts, max_length: int) -> list[EncodedExample]:
    """Encode examples with their retrieved neighbours and emotion in the chatbot's prompt format."""
    return [encode_example(chat.tokenizer, ex.history, ex.reply, c.references, c.emotion, max_length)
            for ex, c in zip(examples, contexts)]


class ExampleDataset(torch.utils.data.Dataset):
    """Encoded examples as the Trainer expects them (dicts, so it can group them by length)."""

    def __init__(self, encoded: list[EncodedExample]):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return features(self.encoded[i])


class ReplyLossTrainer(Trainer):
    """A Trainer whose loss is the reply tokens' NLL, with logits computed for the reply span only."""

    # The loss below is already divided by the reply tokens of the whole accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # so the Trainer counts the reply tokens across accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean NLL per reply token (over the accumulated batch when the Trainer gives its token count)."""
        nll, count = reply_loss(model, inputs)
        loss = nll / max(int(num_items_in_batch) if num_items_in_batch is not None else count, 1)
        return (loss, {}) if return_outputs else loss


def plot_losses(log_history: list[dict], path: Path) -> None:
    """Training and evaluation loss per step (the report's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="valid loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (reply tokens)")
    ax.set_title("Training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate perplexity, save the adapter with its metadata, plot and sample."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    out = Path(args.output_dir)
    started = time.perf_counter()
    try:
        chat = load_base_model(args.base_model, args.device)
        train_examples = load_examples(args.data_dir, "train", args.limit or None, args.seed)
        valid_examples = load_examples(args.data_dir, "valid", args.eval_limit or None, args.seed)
        test_examples = load_examples(args.data_dir, "test", args.test_limit or None, args.seed)
        embedder = load_embedder(device=args.device)
        retriever = Retriever(Path(args.index_dir) if args.index_dir else default_index_dir(), embedder) \
            if args.retrieval else None
    except (DataError, ModelLoadError, IndexLoadError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    emotion = load_emotion_detector(embedder) if args.emotion else None

    def encode(examples: list[Example]) -> list[EncodedExample]:
        return encode_all(chat, examples, example_contexts(examples, embedder, retriever, emotion, args.k),
                          args.max_length)

    train_set, valid_set, test_set = encode(train_examples), encode(valid_examples), encode(test_examples)
    tokens = sum(len(e.input_ids) for e in train_set)
    logger.info("%d train examples (%d tokens), %d valid, %d test", len(train_set), tokens, len(valid_set), len(test_set))
    test_replies = [ex.reply for ex in test_examples]
    base_test = perplexity(chat, test_set, test_replies, progress=True)

    config = peft_config(args.method, chat.model.config.model_type, chat.model.config.num_hidden_layers, args,
                         resolve_base_model(args.base_model))
    model = chat.model
    if config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, config)
        model.print_trainable_parameters()
    model.train()
    lr = args.lr or {"lora": 2e-4, "prompt-tuning": 3e-2, "full": 2e-5}[args.method]
    device = get_device(args.device)
    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(0.03 * args.max_steps)) if args.max_steps > 0 else 10,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,
        save_total_limit=args.save_limit,
        logging_steps=max(1, min(10, args.eval_steps)),
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        use_cpu=device.type == "cpu",
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        remove_unused_columns=False,
        prediction_loss_only=True,
        train_sampling_strategy="group_by_length",  # less padding per batch
        disable_tqdm=False,
    )
    pad_id = chat.tokenizer.pad_token_id
    trainer = ReplyLossTrainer(
        model=model,
        args=training_args,
        train_dataset=ExampleDataset(train_set),
        eval_dataset=ExampleDataset(valid_set),
        data_collator=lambda batch: pad_batch(batch, pad_id),
    )
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*")) if args.resume else []
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    model.eval()

    tuned = type(chat)(model=model, tokenizer=chat.tokenizer, base_model=chat.base_model,
                       adapter_path=out if config is not None else None)
    metrics = {
        "valid_perplexity_detail": perplexity(tuned, valid_set, [ex.reply for ex in valid_examples]),
        "test_perplexity_detail": perplexity(tuned, test_set, test_replies, progress=True),
        "base_test_perplexity_detail": base_test,
    }
    metrics.update(
        valid_perplexity=metrics["valid_perplexity_detail"]["perplexity"],
        test_perplexity=metrics["test_perplexity_detail"]["perplexity"],
        test_word_perplexity=metrics["test_perplexity_detail"]["word_perplexity"],
        base_test_perplexity=base_test["perplexity"],
        base_test_word_perplexity=base_test["word_perplexity"],
        train_examples=len(train_set),
        train_tokens=tokens,
        train_seconds=round(time.perf_counter() - started, 1),
        final_train_loss=next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h), None),
        protocol=(f"gold listener replies of {len(test_set)} seeded test examples (valid: {len(valid_set)}); "
                  "loss on reply tokens + end-of-turn token; word perplexity = exp(total NLL / reply words); "
                  f"retrieval={'on' if retriever else 'off'} (k={args.k}, own conversation excluded), "
                  f"emotion={'on' if emotion else 'off'}"),
        device=str(device),
    )
    if any(math.isnan(v) for v in (metrics["test_perplexity"], metrics["valid_perplexity"])):
        logger.warning("NaN perplexity: check the learning rate")
    training_record = dict(vars(args), learning_rate=lr, retrieval_k=args.k if retriever else 0,
                           index_manifest=retriever.manifest if retriever else None)
    save_adapter(model, chat.tokenizer, out, chat.base_model, training_record, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(trainer.state.log_history, out / "loss.png")

    bot = EmpatheticChatbot(tuned, retriever, emotion, None, k=args.k, embedder=embedder)
    samples = []
    for ex in test_examples[:SAMPLE_PROMPTS]:
        reply = bot.respond(ex.history[-1].text, ex.history[:-1], use_retrieval=retriever is not None,
                            settings=PRESETS["greedy"])
        samples.append({"history": [t.text for t in ex.history], "gold": ex.reply, "reply": reply.text})
        print(f"\n> {ex.history[-1].text}\n  gold: {ex.reply}\n  ours: {reply.text}")
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("_detail")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
