"""Fine-tune a causal LM on Empathetic Dialogues (prompt tuning, LoRA or full), optionally retrieval-augmented.

Single process: `python train.py --method lora --limit 5000`.
Several GPUs, no code change: `accelerate launch train.py ...` or `torchrun --nproc_per_node N train.py ...`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from chatbot import options
from chatbot.bot import EmpatheticChatbot
from chatbot.contexts import example_contexts
from chatbot.data import DataError, Example, load_examples
from chatbot.embeddings import load_embedder
from chatbot.emotion import load_emotion_detector
from chatbot.generation import PRESETS
from chatbot.models import ModelLoadError, load_base_model, resolve_base_model, save_adapter
from chatbot.prompts import DEFAULT_MAX_PROMPT_TOKENS, SYSTEM_INSTRUCTION, EncodedExample, encode_example
from chatbot.retriever import IndexLoadError, Retriever
from chatbot.runtime import default_index_dir, set_seed
from chatbot.scoring import features, pad_batch, perplexity, reply_loss

logger = logging.getLogger("train")
METHODS = ("prompt-tuning", "lora", "full")
# LoRA targets per architecture: attention projections (GPT-2 fuses q,k,v in a Conv1D, hence fan_in_fan_out).
LORA_TARGETS = {"llama": (["q_proj", "k_proj", "v_proj", "o_proj"], False), "gpt2": (["c_attn"], True)}
SAMPLE_PROMPTS = 5
LEARNING_RATES = {"lora": 2e-4, "prompt-tuning": 3e-2, "full": 2e-5}


@dataclass
class ScriptArguments:
    """What to train, on which examples, in the chatbot's prompt format (the Trainer's own flags: TrainConfig)."""

    method: str = options.option("lora", "what to train (prompt tuning is the report's method)", choices=METHODS)
    base_model: str = options.base_model_option()
    data_dir: str | None = options.data_dir_option()
    index_dir: str | None = options.index_dir_option()
    retrieval: bool = options.option(True, "put each example's top-k train neighbours (never its own conversation) "
                                           "in its prompt")
    k: int = options.k_option()
    emotion: bool = options.option(True, "put the detected emotion in each prompt (as at inference)")
    preset: str = options.preset_option("greedy")
    max_length: int = options.option(DEFAULT_MAX_PROMPT_TOKENS, "tokens per example (prompt + reply)")
    limit: int = options.option(0, "train on a seeded random subset of N examples (0 = all)")
    eval_limit: int = options.option(200, "valid examples evaluated during training (0 = all)")
    test_limit: int = options.option(300, "test examples for the final perplexity (0 = all)")
    num_virtual_tokens: int = options.option(20, "prompt tuning: virtual tokens")
    lora_r: int = options.option(16, "LoRA rank")
    lora_alpha: int = options.option(32, "LoRA alpha")
    lora_layers: int = options.option(0, "adapt only the top N transformer layers (0 = all); backpropagation stops "
                                         "at the lowest adapted layer, so fewer layers train faster")

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers before anything loads."""
        options.at_least(self, 0, "limit", "eval_limit", "test_limit", "lora_layers")
        options.at_least(self, 1, "k", "max_length", "num_virtual_tokens", "lora_r")


def trainer_default(name: str, value: object) -> Any:
    """TrainingArguments' field `name`, help included, with this project's default."""
    return field(default=value, metadata=TrainingArguments.__dataclass_fields__[name].metadata)


@dataclass
class TrainConfig(TrainingArguments):
    """TrainingArguments with this project's defaults, as trl's SFTConfig: every Trainer flag works as documented."""

    learning_rate: float | None = field(default=None, metadata={
        "help": f"peak learning rate (unset: {', '.join(f'{v:g} {k}' for k, v in LEARNING_RATES.items())})"})
    num_train_epochs: float = trainer_default("num_train_epochs", 1.0)
    lr_scheduler_type: str = trainer_default("lr_scheduler_type", "cosine")
    warmup_steps: float = trainer_default("warmup_steps", 0.03)
    eval_strategy: str = trainer_default("eval_strategy", "steps")
    eval_steps: float | None = trainer_default("eval_steps", 200)
    save_steps: float = trainer_default("save_steps", 200)
    save_total_limit: int | None = trainer_default("save_total_limit", 2)
    logging_steps: float = trainer_default("logging_steps", 10)
    remove_unused_columns: bool = trainer_default("remove_unused_columns", False)
    prediction_loss_only: bool = trainer_default("prediction_loss_only", True)
    train_sampling_strategy: str = trainer_default("train_sampling_strategy", "group_by_length")  # less padding

    def __post_init__(self) -> None:
        """Check this project's rules, then let TrainingArguments check its own."""
        if not self.output_dir:
            raise ValueError("--output-dir is required: where the adapter (or full model), metrics and plots go")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output-dir {self.output_dir} is a file, not a folder")
        options.at_least(self, 1, "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps")
        super().__post_init__()


def peft_config(method: str, model_type: str, num_layers: int, args: ScriptArguments, tokenizer_path: str):
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
    args, config = options.Parser((ScriptArguments, TrainConfig), description=__doc__.split("\n\n")[0]).parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(config.seed)
    config.learning_rate = config.learning_rate or LEARNING_RATES[args.method]
    out, device = Path(config.output_dir), str(config.device)
    started = time.perf_counter()
    try:
        chat = load_base_model(args.base_model, device)
        train_examples = load_examples(args.data_dir, "train", args.limit or None, config.seed)
        valid_examples = load_examples(args.data_dir, "valid", args.eval_limit or None, config.seed)
        test_examples = load_examples(args.data_dir, "test", args.test_limit or None, config.seed)
        embedder = load_embedder(device=device)
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

    adapter_config = peft_config(args.method, chat.model.config.model_type, chat.model.config.num_hidden_layers,
                                 args, resolve_base_model(args.base_model))
    model = chat.model
    if adapter_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter_config)
        model.print_trainable_parameters()
    model.train()
    pad_id = chat.tokenizer.pad_token_id
    trainer = ReplyLossTrainer(
        model=model,
        args=config,
        train_dataset=ExampleDataset(train_set),
        eval_dataset=ExampleDataset(valid_set),
        data_collator=lambda batch: pad_batch(batch, pad_id),
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    model.eval()

    tuned = type(chat)(model=model, tokenizer=chat.tokenizer, base_model=chat.base_model,
                       adapter_path=out if adapter_config is not None else None)
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
        device=device,
        train_losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
    )
    if any(math.isnan(v) for v in (metrics["test_perplexity"], metrics["valid_perplexity"])):
        logger.warning("NaN perplexity: check the learning rate")
    defaults = TrainConfig(output_dir=config.output_dir)  # the Trainer flags this run changed are recorded
    changed = {f.name: getattr(config, f.name) for f in fields(config)
               if f.init and getattr(config, f.name) != getattr(defaults, f.name)}
    training_record = dict(asdict(args), **changed, retrieval_k=args.k if retriever else 0,
                           index_manifest=retriever.manifest if retriever else None)
    save_adapter(model, chat.tokenizer, out, chat.base_model, training_record, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(trainer.state.log_history, out / "loss.png")

    bot = EmpatheticChatbot(tuned, retriever, emotion, None, k=args.k, embedder=embedder)
    samples = []
    for ex in test_examples[:SAMPLE_PROMPTS]:
        reply = bot.respond(ex.history[-1].text, ex.history[:-1], use_retrieval=retriever is not None,
                            settings=PRESETS[args.preset])
        samples.append({"history": [t.text for t in ex.history], "gold": ex.reply, "reply": reply.text})
        print(f"\n> {ex.history[-1].text}\n  gold: {ex.reply}\n  ours: {reply.text}")
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("_detail")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
