"""Perplexity of gold listener replies: token-level and word-normalised, shared by train.py and eval.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from chatbot.models import ChatModel
from chatbot.prompts import EncodedExample


def pad_batch(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (pad) and labels (-100); padding never counts in the loss."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = [ex.input_ids + [pad_id] * (width - len(ex.input_ids)) for ex in batch]
    labels = [ex.labels + [-100] * (width - len(ex.labels)) for ex in batch]
    mask = [[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in batch]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


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
    batches = range(0, len(encoded), batch_size)
    with context:
        for start in tqdm(batches, desc="perplexity", disable=not progress):
            batch = pad_batch(encoded[start:start + batch_size], chat.tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**batch).loss  # mean over the shifted, non-ignored label tokens of the batch
            total_nll += float(loss) * count
            total_tokens += count
    words = sum(len(reply.split()) for reply in replies)
    return {
        "nll": round(total_nll, 4),
        "tokens": total_tokens,
        "words": words,
        "perplexity": round(math.exp(total_nll / max(total_tokens, 1)), 4),
        "word_perplexity": round(math.exp(total_nll / max(words, 1)), 4),
    }
