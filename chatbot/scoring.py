"""Reply loss and perplexity of gold listener replies (token-level and word-normalised), shared by train.py and eval.py."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from chatbot.models import ChatModel, is_prompt_learning, position_ids
from chatbot.prompts import EncodedExample

Features = Mapping[str, Sequence[int]]


def features(example: EncodedExample) -> dict[str, list[int]]:
    """The token ids and labels of an encoded example, as the Trainer's dataset items."""
    return {"input_ids": example.input_ids, "labels": example.labels}


def pad_batch(batch: Sequence[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad ids (pad) and labels (-100): every reply ends its row, and padding never counts in the loss."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = [[pad_id] * (width - len(ex["input_ids"])) + list(ex["input_ids"]) for ex in batch]
    labels = [[-100] * (width - len(ex["labels"])) + list(ex["labels"]) for ex in batch]
    mask = torch.tensor([[0] * (width - len(ex["input_ids"])) + [1] * len(ex["input_ids"]) for ex in batch])
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": mask,
            "position_ids": position_ids(mask)}


def reply_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed NLL of the labelled (reply) tokens and their count.

    Logits are computed only over the trailing span that holds labels: the LM head over a 49k vocabulary is
    a fifth of the model's compute and most of its activation memory, and replies are a tenth of each row.
    """
    labels = batch["labels"]
    labelled = (labels != -100).any(0).nonzero()
    first = max(int(labelled[0]) if len(labelled) else labels.shape[1] - 1, 1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not is_prompt_learning(model):
        inputs["position_ids"] = batch["position_ids"]  # peft prompt learning refuses position ids
    logits = model(**inputs, logits_to_keep=labels.shape[1] - first + 1).logits[:, :-1]
    targets = labels[:, first:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


@torch.inference_mode()
def perplexity(
    chat: ChatModel,
    encoded: Sequence[EncodedExample],
    replies: Sequence[str],
    batch_size: int = 8,
    use_adapter: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """exp(total NLL / reply tokens) and exp(total NLL / reply words) over examples (reply + end-of-turn token)."""
    model, total_nll, total_tokens = chat.model, 0.0, 0
    context = model.disable_adapter() if chat.has_adapter and not use_adapter else nullcontext()
    # Similar lengths batched together waste less on padding; the sums do not depend on order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    batches = range(0, len(order), batch_size)
    with context:
        for start in tqdm(batches, desc="perplexity", disable=not progress):
            rows = [features(encoded[i]) for i in order[start:start + batch_size]]
            batch = {k: v.to(model.device) for k, v in pad_batch(rows, chat.tokenizer.pad_token_id).items()}
            nll, count = reply_loss(model, batch)
            total_nll += float(nll)
            total_tokens += count
    words = sum(len(reply.split()) for reply in replies)
    return {
        "nll": round(total_nll, 4),
        "tokens": total_tokens,
        "words": words,
        "perplexity": round(math.exp(total_nll / max(total_tokens, 1)), 4),
        "word_perplexity": round(math.exp(total_nll / max(words, 1)), 4),
    }
