"""Fast replies on transformers + PyTorch: a hand-written decode loop over the model's forward, and int8 weights.

On a CPU the 135M model is bound by reading its weights for every new token and by per-operation overhead,
not by arithmetic. Two levers, measured by `python -m chatbot.bench`:

* `DecodeLoop` calls the model's forward directly with a KV cache, one forward per new token, for a batch of
  prompts (left-padded, so the Compare tab decodes both systems in one pass). It applies the same logits
  processors, in the same order, as `model.generate`, so greedy and seeded sampled tokens match it.
* `quantized_copy` makes a copy of the model whose Linear layers hold int8 weights (torch dynamic
  quantization): a quarter of the bytes to read per token. LoRA adapters stay unmerged on top, so the base
  model (adapter off) and mixed base/tuned batches still work. Dynamic quantization scales activations per
  tensor, which a whole prompt breaks (a few positions carry huge activations and crush the resolution of
  all others: held-out perplexity 38 -> 121 when scoring whole sequences in int8). So the prompt is read by
  the fp32 model (`prefill_model`) and only the one-token decode steps run in int8. `perplexity_check`
  measures exactly that path, token by token, next to fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chatbot.generation import GenerationSettings
from chatbot.models import ChatModel, is_prompt_learning, position_ids
from chatbot.prompts import TURN_MARKERS, EncodedExample, clean_reply, first_sentences
from chatbot.runtime import DEFAULT_SEED

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
# Held-out perplexity may rise at most this much (relative) for the int8 model to be the default.
MAX_PERPLEXITY_INCREASE = 0.01


def supports(model: torch.nn.Module, settings: GenerationSettings) -> bool:
    """Whether `DecodeLoop` can decode with these settings (beam search and prompt tuning use `generate`)."""
    return settings.num_beams <= 1 and not is_prompt_learning(model)


def logits_processors(settings: GenerationSettings) -> LogitsProcessorList:
    """The processors `generate` applies for these settings, in its order, so the loop picks the same tokens."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def stop_token_ids(model: PreTrainedModel, tokenizer: object) -> set[int]:
    """Token ids that end a turn: the model's end-of-sequence id(s) and the tokenizer's (SmolLM2: <|im_end|>)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {getattr(tokenizer, "eos_token_id", None)}
    return {i for i in ids if i is not None}


class DecodeLoop:
    """Decode a batch of token-id prompts together, one forward per new token, reusing a KV cache.

    Iterating yields, after each step, the new token of every row (None for rows already finished). A row
    finishes on an end-of-turn token, at `max_new_tokens`, or when the consumer calls `finish(row)` (enough
    sentences, a turn marker in the text). Runs in the caller's thread: closing the iterator stops it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        stop_ids: set[int],
        pad_id: int,
        adapter_names: Sequence[str] | None = None,
        prefill_model: PreTrainedModel | None = None,
    ):
        """Set up the batch (`prefill_model`, default `model`, reads the prompts); no model call happens yet."""
        if not prompts:
            raise ValueError("DecodeLoop needs at least one prompt")
        self.model, self.settings, self.stop_ids, self.pad_id = model, settings, stop_ids, pad_id
        self.prefill_model = prefill_model or model
        width = max(len(p) for p in prompts)
        # Left padding: every row's next token goes in the same, last column.
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        # Only a batch that mixes adapter states needs peft's per-row adapter names.
        self.adapter_names = list(adapter_names) if adapter_names and len(set(adapter_names)) > 1 else None
        self.finished = [False] * len(prompts)
        self.processors = logits_processors(settings)

    def finish(self, row: int) -> None:
        """Stop decoding `row` (its later tokens are padding and nobody reads them)."""
        self.finished[row] = True

    def _forward(self, model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Float32 logits of the last position of every row."""
        # Positions count from each row's first real token, as in an unpadded prompt.
        positions = position_ids(self.mask)[:, -input_ids.shape[1]:]
        kwargs = {"adapter_names": self.adapter_names} if self.adapter_names else {}
        with torch.inference_mode():  # per step: the consumer may resume this generator from another thread
            out = model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1, **kwargs)
            return out.logits[:, -1].to(dtype=torch.float32)

    def _next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the processors, then pick greedily or sample, as `generate` does."""
        with torch.inference_mode():
            scores = self.processors(self.ids, logits)
            if self.settings.do_sample:
                return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            return scores.argmax(-1)

    def __iter__(self) -> Iterator[list[int | None]]:
        """Yield each step's new token per row until every row has finished."""
        cache = DynamicCache(config=self.model.config)
        step_input, model = self.ids, self.prefill_model
        for _ in range(self.settings.max_new_tokens):
            if all(self.finished):
                return
            tokens = self._next_tokens(self._forward(model, step_input, cache))
            model = self.model
            live = torch.tensor([not f for f in self.finished], device=tokens.device)
            tokens = torch.where(live, tokens, torch.full_like(tokens, self.pad_id))
            with torch.inference_mode():
                self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
                self.mask = torch.cat([self.mask, live[:, None].to(self.mask.dtype)], dim=-1)
            step_input = tokens[:, None]
            new: list[int | None] = []
            for row, token in enumerate(tokens.tolist()):  # the one host read per step: text streams anyway
                if self.finished[row]:
                    new.append(None)
                    continue
                new.append(token)
                if token in self.stop_ids:
                    self.finished[row] = True
            yield new


@dataclass
class ReplyText:
    """Raw generated text -> the cleaned reply shown so far, and whether the reply is complete."""

    max_sentences: int
    raw: str = ""
    shown: str | None = None
    done: bool = False

    def add(self, piece: str) -> str | None:
        """Append raw text; returns the cleaned reply when it changed (None otherwise)."""
        self.raw += piece
        return self.set_raw(self.raw)

    def set_raw(self, raw: str) -> str | None:
        """Replace the raw text; returns the cleaned reply when it changed (None otherwise)."""
        self.raw = raw
        if raw.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return None
        text = clean_reply(raw)
        enough = first_sentences(text, self.max_sentences)
        # A turn marker means the model began another turn: clean_reply already cut it, nothing later counts.
        self.done = bool(enough) or any(marker in raw for marker in TURN_MARKERS)
        text = enough or text
        if text and text != self.shown:
            self.shown = text
            return text
        return None


def quantizable_linears(model: torch.nn.Module, include_head: bool) -> set[str]:
    """Names of the plain Linear layers to quantize: not peft's small LoRA matrices, the LM head only if asked."""
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is torch.nn.Linear and "lora_" not in name and (include_head or leaf != "lm_head"):
            names.add(name)
    return names


def quantized_copy(model: PreTrainedModel, include_head: bool = True) -> PreTrainedModel:
    """A copy with int8 weights in its Linear layers (per output channel), sharing the input embedding."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    embedding = model.get_input_embeddings().weight
    # The embedding (and an LM head tied to it) is read, never changed: share it instead of copying 113 MB.
    twin = copy.deepcopy(model, memo={id(embedding): embedding})
    spec = {name: per_channel_dynamic_qconfig for name in quantizable_linears(twin, include_head)}
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore")
        quantize_dynamic(twin, spec, inplace=True)
    twin.eval()
    return twin


def decode_nll(prefill_model: PreTrainedModel, model: PreTrainedModel, example: EncodedExample) -> tuple[float, int]:
    """NLL of an example's reply tokens as served: prompt read by `prefill_model`, then one token per step."""
    start = next((i for i, label in enumerate(example.labels) if label != -100), len(example.labels))
    prompt, reply = example.input_ids[:start], example.input_ids[start:]
    if not prompt or not reply:
        return 0.0, 0
    cache = DynamicCache(config=model.config)
    nll = 0.0
    with torch.inference_mode():
        logits = prefill_model(input_ids=torch.tensor([prompt], device=model.device), cache=cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
        for i, token in enumerate(reply):
            nll -= float(torch.log_softmax(logits.float(), dim=-1)[token])
            if i + 1 < len(reply):  # teacher forcing: the gold token goes in next, whatever the model preferred
                step = torch.tensor([[token]], device=model.device)
                logits = model(input_ids=step, cache=cache, use_cache=True).logits[0, -1]
    return nll, len(reply)


def perplexity_check(chat: ChatModel, data_dir: str | None, limit: int = 200, seed: int = DEFAULT_SEED,
                     quantized: PreTrainedModel | None = None) -> dict:
    """Held-out reply perplexity, decoded as served, of fp32 and of int8 decode steps, on seeded test examples."""
    from chatbot.data import load_examples
    from chatbot.prompts import encode_example

    examples = load_examples(data_dir, "test", limit, seed)
    encoded = [encode_example(chat.tokenizer, ex.history, ex.reply) for ex in examples]
    words = sum(len(ex.reply.split()) for ex in examples)
    results: dict = {"examples": len(examples), "seed": seed, "adapter": str(chat.adapter_path or "none"),
                     "method": "prompt read in fp32, reply tokens fed one by one (teacher forcing), as served"}
    quantized = quantized if quantized is not None else quantized_copy(chat.model)
    for name, model in [("fp32", chat.model), ("int8", quantized)]:
        started = time.perf_counter()
        total, tokens = 0.0, 0
        for example in encoded:
            nll, count = decode_nll(chat.model, model, example)
            total, tokens = total + nll, tokens + count
        results[name] = {"nll": round(total, 4), "tokens": tokens, "words": words,
                         "perplexity": round(math.exp(total / max(tokens, 1)), 4),
                         "word_perplexity": round(math.exp(total / max(words, 1)), 4),
                         "seconds": round(time.perf_counter() - started, 1)}
    ratio = results["int8"]["perplexity"] / results["fp32"]["perplexity"]
    results["relative_increase"] = round(ratio - 1, 5)
    results["within_limit"] = ratio - 1 <= MAX_PERPLEXITY_INCREASE
    return results


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally save) the fp32 vs int8 held-out perplexity of the chat model."""
    from chatbot.models import DEFAULT_BASE_MODEL, adapter_choice, load_chat_model

    parser = argparse.ArgumentParser(description="Compare held-out perplexity of the fp32 model and its int8 copy.")
    parser.add_argument("--data-dir", default=None, help="Empathetic Dialogues folder (default: $ED_DATA_DIR)")
    parser.add_argument("--limit", type=int, default=200, help="seeded test examples to score")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed that picks the examples")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="base model name or folder")
    parser.add_argument("--adapter", default="default",
                        help="adapter folder, 'default' (the shipped one, if any) or 'none'")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    chat = load_chat_model(args.base_model, adapter_choice(args.adapter))
    result = perplexity_check(chat, args.data_dir, args.limit, args.seed)
    text = json.dumps(result, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
