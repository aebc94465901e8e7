"""Reply decoding behind one interface, on ONNX Runtime (served default) or transformers (the reference).

Both engines share everything but the forward pass: `Decoder` picks every token itself (the same logits
processors as `model.generate`, greedy or seeded sampling per row), so greedy text differs between engines only
where their float arithmetic does. An engine is a `Backend`: next-token logits for a batch of prompts with a
KV cache.

* `TorchBackend` runs the transformers model (any base model, GPU, peft LoRA with per-row adapters).
* `OrtBackend` runs an ONNX export of the same model (onnxruntime-genai's model builder, `export_onnx`, cached
  with a manifest) on an onnxruntime session, the KV cache bound in place. The LoRA adapter becomes a run-time
  adapter: its weights are graph inputs whose default is zero (adapter off = base model), bound per call, and a
  per-row scale of the LoRA update lets base and tuned rows (Compare) step in one batch. onnxruntime-genai's own
  generator loop was the engine before: it cannot share one prompt's cache between rows (a message's candidates
  read their prompt once per row), reuse a system turn read before, or mix adapters in a batch; here every
  distinct (prompt, adapter) is read once (the system turn from `PrefixCache`) and its cache copied to its rows,
  and all of a request's rows step as one batch. Session calls release the GIL, so users are served
  concurrently, not behind one lock.

Beam search and prompt-tuning adapters stay on `model.generate` (see chatbot.bot).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from chatbot.generation import GenerationSettings
from chatbot.models import ChatModel, position_ids, resolve_base_model
from chatbot.prompts import TURN_MARKERS, clean_reply, first_sentences
from chatbot.runtime import DEFAULT_SEED, atomic_folder, cache_dir, cpu_threads, model_checksum, model_files

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
# Bump when the export's layout changes: older cached exports are rebuilt (2: pruned LM head; 3: per-row LoRA scale).
EXPORT_FORMAT_VERSION = 3
ROW_SCALE = "lora_row_scale"  # graph input [batch, 1, 1]: each row's share of the LoRA update (1 tuned, 0 base)
MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapter.onnx_adapter"
PRECISIONS = ("fp32", "int8", "int4")
# A quantized precision may name the builder's weight-quantization options: <int8|int4>[-acc<level>][-b<block size>]
# [-fp32head], e.g. int4-acc1-b128 (README: Performance). An option left out takes its default here, the builder's own
# on CPU; a name that only repeats defaults is the plain precision's export.
QUANT_OPTIONS = {"acc": ("accuracy_level", (0, 1, 2, 3, 4), 4), "b": ("block_size", (16, 32, 64, 128, 256), 32)}
FP32_HEAD = "fp32head"  # keep the LM head's MatMul in fp32 (the tied embedding's Gather is still quantized in int4)
PRECISION_FORM = "fp32, int8 or int4, the last two optionally with -acc<0-4>, -b<16|32|64|128|256>, -fp32head"
# The projections a LoRA adapter can target, as the builder names their MatMuls (attention, then MLP).
LORA_MODULES = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# Model types whose export was checked against transformers here; others (GPT-2) decode with transformers.
EXPORTABLE_TYPES = ("llama",)
# System turns whose KV is kept: one per emotion and adapter state covers a busy app (about 4 MB each for SmolLM2).
PREFIX_CACHE_SIZE = 16


class ExportError(RuntimeError):
    """The ONNX export cannot be built or loaded; callers fall back to transformers."""


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread inside the block: the token choice's tensors are one row of logits per reply, too small
    to gain from a second thread, and OpenMP's idle threads spin after each parallel op, taking the cores that
    the ONNX session's decode step needs (README: Performance)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def logits_processors(settings: GenerationSettings, sampling: bool) -> LogitsProcessorList:
    """The processors `generate` applies before its top-k / top-p cut, in its order (`Decoder` makes that cut).

    Penalties, then temperature for sampled rows: it keeps the top token on top, so greedy rows of a mixed batch
    are unaffected.
    """
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if sampling and settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
    return processors


def sampling_distribution(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after `generate`'s top-k then top-p cuts, over the k best tokens (`index`; None: all of them).

    Top-p runs on the k best scores only: the distribution `generate`'s warpers give over the whole vocabulary (top-k
    cuts the rest anyway), without sorting every score of every row at every step.
    """
    index = None
    if top_k:
        scores, index = scores.topk(min(top_k, scores.shape[-1]))
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1), index


def adapter_state(chat: ChatModel, adapter: bool) -> AbstractContextManager:
    """The tuned adapter switched off for the duration (base-model rows) or left as it is."""
    return chat.model.disable_adapter() if chat.has_adapter and not adapter else nullcontext()


def stop_token_ids(chat: ChatModel) -> set[int]:
    """Token ids that end a turn: the model's end-of-sequence id(s) and the tokenizer's (SmolLM2: <|im_end|>)."""
    eos = getattr(chat.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {getattr(chat.tokenizer, "eos_token_id", None)}
    return {i for i in ids if i is not None}


@dataclass(frozen=True)
class Row:
    """One reply to decode: its prompt, adapter state and how its tokens are picked."""

    prompt: tuple[int, ...]
    adapter: bool  # the tuned adapter on (True) or the base model
    sample: bool  # sample (with `seed`) or pick the top token
    seed: int | None = None


def candidate_rows(prompt: Sequence[int], adapter: bool, settings: GenerationSettings) -> list[Row]:
    """`settings.candidates` rows for one message: the first decoded as the settings say, the rest seeded samples."""
    base_seed = settings.seed if settings.seed is not None else int(torch.seed() % 2**31)
    return [
        Row(tuple(prompt), adapter, settings.do_sample or i > 0, base_seed + i) for i in range(settings.candidates)
    ]


class Backend(Protocol):
    """Next-token logits of a batch of rows, keeping a KV cache between calls."""

    name: str

    def prefill(self) -> torch.Tensor:
        """Float32 logits [rows, vocab] after reading every prompt."""

    def step(self, tokens: Sequence[int], active: Sequence[bool]) -> torch.Tensor:
        """Feed one token per row (finished rows, `active` False, get a pad token); logits after it.

        A backend may skip work for finished rows; their logits are then meaningless.
        """

    def close(self) -> None:
        """Release what the decode held."""


class Decoder:
    """Decode rows together: yields, after each step, every row's new token (None once a row has finished).

    A row finishes on an end-of-turn token, at `max_new_tokens`, or when the consumer calls `finish(row)` (enough
    sentences, a turn marker in the text). Runs in the caller's thread: closing the iterator stops it.
    """

    def __init__(self, backend: Backend, rows: Sequence[Row], settings: GenerationSettings, stop_ids: set[int],
                 pad_id: int):
        """Set up the token choice; no model call happens yet."""
        self.backend, self.rows, self.settings, self.stop_ids, self.pad_id = backend, rows, settings, stop_ids, pad_id
        self.finished = [False] * len(rows)
        self.processors = logits_processors(settings, any(row.sample for row in rows))
        # One generator per sampled row: a candidate's tokens do not depend on what else is in the batch.
        self.generators = [torch.Generator().manual_seed(row.seed) if row.sample else None for row in rows]
        width = max(len(row.prompt) for row in rows)
        # The processors read each row's tokens so far; left padding with the pad id, as `generate` would see.
        self.ids = torch.tensor([[pad_id] * (width - len(row.prompt)) + list(row.prompt) for row in rows])

    def finish(self, row: int) -> None:
        """Stop decoding `row` (its later tokens are padding and nobody reads them)."""
        self.finished[row] = True

    def _choose(self, logits: torch.Tensor) -> list[int]:
        """Apply the processors, then pick each row's token greedily or by its own seeded draw."""
        with torch.inference_mode(), one_torch_thread():
            scores = self.processors(self.ids, logits.float())
            tokens = scores.argmax(-1)
            sampled = [i for i, g in enumerate(self.generators) if g is not None and not self.finished[i]]
            if sampled:
                tokens[sampled] = self._draw(scores[sampled], [self.generators[i] for i in sampled])
        return [self.pad_id if done else token for token, done in zip(tokens.tolist(), self.finished)]

    def _draw(self, scores: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One seeded draw per row from the top-k / top-p distribution of its scores."""
        probs, index = sampling_distribution(scores, self.settings.top_k, self.settings.top_p)
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
        return picks if index is None else index.gather(1, picks[:, None])[:, 0]

    def __iter__(self) -> Iterator[list[int | None]]:
        """Yield each step's new token per row until every row has finished."""
        logits = self.backend.prefill()
        for step in range(self.settings.max_new_tokens):
            if all(self.finished):
                return
            tokens = self._choose(logits)
            new: list[int | None] = []
            for row, token in enumerate(tokens):
                new.append(None if self.finished[row] else token)
                if token in self.stop_ids:
                    self.finished[row] = True
            self.ids = torch.cat([self.ids, torch.tensor(tokens)[:, None]], dim=-1)
            yield new
            if step + 1 < self.settings.max_new_tokens and not all(self.finished):
                logits = self.backend.step(tokens, [not done for done in self.finished])


class TorchBackend:
    """The transformers model's forward with a DynamicCache; rows may mix adapter states (peft per-row LoRA)."""

    name = "transformers"

    def __init__(self, chat: ChatModel, rows: Sequence[Row]):
        """Left-pad the prompts into one batch on the model's device."""
        self.model = chat.model
        pad_id = chat.tokenizer.pad_token_id
        width = max(len(row.prompt) for row in rows)
        device = self.model.device
        self.ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + list(r.prompt) for r in rows], device=device)
        self.mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=device)
        adapter = getattr(self.model, "active_adapter", None)
        names = [adapter if row.adapter else BASE_ADAPTER for row in rows]
        # Only a batch that mixes adapter states needs peft's per-row adapter names.
        self.kwargs = {"adapter_names": names} if chat.has_adapter and len(set(names)) > 1 else {}
        self.chat, self.any_tuned = chat, any(row.adapter for row in rows)  # all-base batches switch LoRA off
        self.cache = DynamicCache(config=self.model.config)

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the last position of every row."""
        # Positions count from each row's first real token, as in an unpadded prompt.
        positions = position_ids(self.mask)[:, -input_ids.shape[1]:]
        with torch.inference_mode(), adapter_state(self.chat, self.any_tuned):
            out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                             use_cache=True, logits_to_keep=1, **self.kwargs)
        return out.logits[:, -1].float().cpu()

    def prefill(self) -> torch.Tensor:
        """Read every prompt."""
        return self._forward(self.ids)

    def step(self, tokens: Sequence[int], active: Sequence[bool]) -> torch.Tensor:
        """One token per row (the batch runs whole: finished rows read their pad token)."""
        step = torch.tensor(tokens, device=self.mask.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(step)], dim=-1)
        return self._forward(step)

    def close(self) -> None:
        """Nothing to release: the cache goes with the object."""


class PrefixCache:
    """KV of recently read prompt prefixes (the system turn: instruction, emotion, example count), least recent out.

    Every reply's prompt opens with one of a few system turns; reading it again for each message is a third of the
    prompt read. Keys are exact token ids and adapter state, so a hit holds exactly what a full read would compute.
    """

    def __init__(self, size: int = PREFIX_CACHE_SIZE):
        """An empty cache of at most `size` prefixes."""
        self.size, self.entries, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: tuple) -> list[np.ndarray] | None:
        """The KV arrays ([1, heads, length, head size] per past input) for `key`, or None."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        return None

    def clear(self) -> None:
        """Forget every prefix."""
        with self.lock:
            self.entries.clear()

    def put(self, key: tuple, kv: list[np.ndarray]) -> None:
        """Remember `kv` for `key`."""
        with self.lock:
            self.entries[key] = kv
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


@dataclass
class OnnxModel:
    """A loaded ONNX export: an onnxruntime session over the builder's graph, the tuned adapter's LoRA weights
    (graph inputs whose default is zero, so leaving them out runs the base model) and the export's manifest."""

    session: ort.InferenceSession
    adapter: dict[str, ort.OrtValue] | None  # the tuned adapter's weights by graph input name
    manifest: dict
    path: Path
    kv_shape: tuple[int, int]  # (key/value heads, head size) of every past input
    past_names: list[str]  # past_key_values.<layer>.key / .value, in layer order
    prefix_end: int  # token that closes the system turn (the model's end-of-turn id): prefixes end there
    vocab: int  # logits per position
    prefixes: PrefixCache = field(default_factory=PrefixCache)

    def decode(self, rows: Sequence[tuple[Sequence[int], bool]], max_new_tokens: int) -> KvDecode:
        """A decode of (prompt, adapter on) rows with room for `max_new_tokens` new tokens each."""
        return KvDecode(self, [(tuple(prompt), adapter) for prompt, adapter in rows], max_new_tokens)


class KvDecode:
    """Rows decoded as one batch over one preallocated KV cache, whatever their prompts and adapter states.

    Each distinct (prompt, adapter) is read once at batch 1 (its system turn from the prefix cache) and its cache
    copied to its rows, so a message's candidates read their prompt once. Rows are right-padded: the attention
    mask marks each row's own length and the builder's attention writes a row's next position there. The cache
    is bound as both the graph's past and present, so a step copies nothing; base and tuned rows share a step
    through the export's per-row LoRA scale.
    """

    def __init__(self, onnx: OnnxModel, rows: Sequence[tuple[tuple[int, ...], bool]], max_new_tokens: int):
        """Set up; no model call happens yet."""
        self.onnx = onnx
        self.keys = [(prompt, adapter and onnx.adapter is not None) for prompt, adapter in rows]
        self.width = max(len(prompt) for prompt, _ in self.keys) + max_new_tokens + 1
        self.lengths = np.array([len(prompt) for prompt, _ in self.keys])  # positions in each row's cache so far
        self.binding = onnx.session.io_binding()

    def _bind(self, binding: ort.IOBinding, cache: list[np.ndarray], adapters: list[bool]) -> np.ndarray:
        """Bind `cache` (as past and present), the adapter for the rows that have it on, and a logits array of
        ours, which is returned."""
        for name, array in zip(self.onnx.past_names, cache):
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
        if any(adapters):
            for name, value in self.onnx.adapter.items():
                binding.bind_ortvalue_input(name, value)
            if not all(adapters):  # a mixed batch: base rows take none of the update
                # Kept on self: the binding does not keep the value's memory alive.
                self.row_scale = ort.OrtValue.ortvalue_from_numpy(np.array(adapters, dtype=np.float32)[:, None, None])
                binding.bind_ortvalue_input(ROW_SCALE, self.row_scale)
        # The logits land in an array of ours: reading them back through the binding wraps every output each step.
        logits = np.empty((cache[0].shape[0], 1, self.onnx.vocab), dtype=np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return logits

    def _run(self, binding: ort.IOBinding, logits: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Read `ids` [batch, n] ending at `lengths` (row by row); float32 logits [batch, vocab] of the last position."""
        binding.bind_cpu_input("input_ids", ids.astype(np.int64))
        mask = np.arange(lengths.max())[None, :] < lengths[:, None]
        binding.bind_cpu_input("attention_mask", mask.astype(np.int64))
        self.onnx.session.run_with_iobinding(binding)  # releases the GIL: other requests run meanwhile
        return logits[:, 0].copy()  # a copy: the next call writes the same array

    def _read(self, prompt: tuple[int, ...], adapter: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """One prompt at batch 1 (its system turn from the prefix cache when seen before): logits and cache."""
        shape = (1, self.onnx.kv_shape[0], self.width, self.onnx.kv_shape[1])
        cache = [np.zeros(shape, dtype=np.float32) for _ in self.onnx.past_names]
        binding = self.onnx.session.io_binding()
        logits = self._bind(binding, cache, [adapter])
        end = self.onnx.prefix_end
        cut = prompt.index(end) + 1 if end in prompt[:-1] else 0
        key = (adapter, prompt[:cut])
        cached = self.onnx.prefixes.get(key) if cut else None
        if cached is None and cut:
            self._run(binding, logits, np.array([prompt[:cut]]), np.array([cut]))
            self.onnx.prefixes.put(key, [array[:, :, :cut].copy() for array in cache])
        elif cached is not None:
            for array, part in zip(cache, cached):
                array[:, :, :cut] = part
        return self._run(binding, logits, np.array([prompt[cut:]]), np.array([len(prompt)])), cache

    def prefill(self) -> np.ndarray:
        """Read every distinct (prompt, adapter) once; logits [rows, vocab]."""
        reads = {key: self._read(*key) for key in dict.fromkeys(self.keys)}
        if len(self.keys) == 1:  # one row: its read's cache as it is
            self.cache = reads[self.keys[0]][1]
        else:
            self.cache = [np.concatenate([reads[key][1][i] for key in self.keys]) for i in range(len(self.onnx.past_names))]
        self.out = self._bind(self.binding, self.cache, [adapter for _, adapter in self.keys])
        self.batch = list(range(len(self.keys)))  # the rows still in the batch, in batch order
        return np.concatenate([reads[key][0] for key in self.keys])

    def _narrow(self, live: list[int]) -> None:
        """Decode only the `live` rows from now on (a copy of their cache, bound afresh)."""
        keep = [self.batch.index(row) for row in live]
        self.cache = [array[keep] for array in self.cache]
        self.lengths, self.batch = self.lengths[keep], live
        self.binding = self.onnx.session.io_binding()
        self.out = self._bind(self.binding, self.cache, [self.keys[row][1] for row in live])

    def step(self, tokens: Sequence[int], active: Sequence[bool]) -> np.ndarray:
        """Feed one token per row; logits [rows, vocab] after it (zeros for rows no longer in the batch).

        Every row finished: no model call at all (Compare's shorter reply while the other goes on).
        """
        live = [row for row in self.batch if active[row]]
        if not live:
            return np.zeros((len(self.keys), self.onnx.vocab), dtype=np.float32)
        # Once half the batch has finished, the rest go on without it (Compare's longer reply, a last candidate):
        # a step then reads less, for one copy of the cache.
        if len(live) <= len(self.batch) // 2:
            self._narrow(live)
        self.lengths += 1
        logits = self._run(self.binding, self.out, np.array([tokens[row] for row in self.batch])[:, None], self.lengths)
        if len(self.batch) == len(self.keys):
            return logits
        out = np.zeros((len(self.keys), logits.shape[1]), dtype=np.float32)
        out[self.batch] = logits
        return out


class OrtBackend:
    """The ONNX export on onnxruntime: every row of a request in one `KvDecode` batch."""

    name = "onnxruntime"

    def __init__(self, onnx: OnnxModel, rows: Sequence[Row], max_new_tokens: int):
        """Set up the batch; no model call yet."""
        self.decode = onnx.decode([(row.prompt, row.adapter) for row in rows], max_new_tokens)

    def prefill(self) -> torch.Tensor:
        """Read every distinct prompt once (rows with the same prompt and adapter share it)."""
        return torch.from_numpy(self.decode.prefill())

    def step(self, tokens: Sequence[int], active: Sequence[bool]) -> torch.Tensor:
        """One token per row; finished rows leave the batch once they are half of it."""
        return torch.from_numpy(self.decode.step(tokens, active))

    def close(self) -> None:
        """Nothing to release: the cache goes with the object."""


def decoder_supports(chat: ChatModel, settings: GenerationSettings) -> bool:
    """Whether `Decoder` can decode these settings (beam search and prompt tuning need `model.generate`)."""
    return settings.num_beams <= 1 and not chat.prompt_learning


def _sources(chat: ChatModel) -> list[Path]:
    """The files an export depends on: base weights and config, then the adapter's weights and config."""
    files = model_files(Path(resolve_base_model(chat.base_model)))
    if chat.adapter_path is not None:
        adapter = Path(chat.adapter_path)
        files += sorted(adapter.glob("adapter_model.*")) + [adapter / "adapter_config.json"]
    return files


def parse_precision(name: str) -> tuple[str, dict]:
    """(builder precision, quantization options) of a precision name; ExportError for a name not of that form.

    "int4-acc1-b128" -> ("int4", {"accuracy_level": 1, "block_size": 128, "fp32_head": False}); fp32 takes no options.
    """
    error = ExportError(f"unknown precision {name!r}; choose {PRECISION_FORM}")
    precision, *parts = name.split("-")
    if precision not in PRECISIONS or precision == "fp32" and parts:
        raise error
    if precision == "fp32":
        return precision, {}
    options = {key: default for key, _, default in QUANT_OPTIONS.values()} | {"fp32_head": False}
    seen = set()
    for part in parts:
        prefix = part.rstrip("0123456789")
        if part == FP32_HEAD:
            key, value = "fp32_head", True
        elif prefix in QUANT_OPTIONS and part != prefix and int(part[len(prefix):]) in QUANT_OPTIONS[prefix][1]:
            key, value = QUANT_OPTIONS[prefix][0], int(part[len(prefix):])
        else:
            raise error
        if key in seen:
            raise error
        seen.add(key)
        options[key] = value
    return precision, options


def precision_name(precision: str, options: dict) -> str:
    """The canonical name of a precision and its options (defaults left out): parse_precision's inverse."""
    parts = [precision] + [f"{prefix}{options[key]}" for prefix, (key, _, default) in QUANT_OPTIONS.items()
                           if options.get(key, default) != default]
    return "-".join(parts + ([FP32_HEAD] if options.get("fp32_head") else []))


def builder_options(chat: ChatModel, precision: str, options: dict) -> list[str]:
    """The model builder's --extra_options for this export (besides the adapter): the pruned LM head and, quantized,
    the accuracy level, block size and the MatMuls that stay fp32.

    The LoRA MatMuls always stay fp32: quantized, their weights would be packed integers the run-time adapter
    could not swap in (and a rank-16 LoRA quantizes badly). Names of projections the adapter does not touch are
    ignored by the builder.
    """
    # The LM head scores the last position only: reading a prompt skips a [prompt, vocabulary] product.
    extra = ["prune_lm_head=true"]
    if precision == "fp32":
        return extra
    keep = [f"/model/layers.{layer}/{group}/{module}/lora_{ab}/MatMul" for layer in range(chat.config.num_hidden_layers)
            for group, modules in LORA_MODULES.items() for module in modules for ab in "AB"] if chat.adapter_path else []
    keep += ["/lm_head/MatMul"] if options["fp32_head"] else []
    extra += [f"accuracy_level={options['accuracy_level']}", f"block_size={options['block_size']}"]
    return extra + ([f"nodes_to_exclude={','.join(keep)}"] if keep else [])


def export_manifest(chat: ChatModel, precision: str) -> dict:
    """What a cached export must match to be reused: sources, builder version, precision (with its quantization
    options: the canonical name, and the options themselves for int8/int4), format version."""
    base, options = parse_precision(precision)
    manifest = {
        "format_version": EXPORT_FORMAT_VERSION,
        "base_model": chat.base_model,
        "adapter": str(chat.adapter_path) if chat.adapter_path else None,
        "source_sha256": model_checksum(_sources(chat)),
        "builder": f"onnxruntime-genai {builder_version()}",
        "precision": precision_name(base, options),
    }
    return manifest | ({"quantization": options} if options else {})


def export_dir(manifest: dict) -> Path:
    """The cache folder of an export, named by what it was built from."""
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "onnx" / f"{manifest['base_model']}-{manifest['precision']}-{key}"


def _runtime_adapter(model_dir: Path) -> None:
    """Turn the baked-in LoRA weights into graph inputs with zero defaults, saved apart as a run-time adapter."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph_path = model_dir / "model.onnx"
    graph = onnx.load(str(graph_path))
    weights = {}
    for init in graph.graph.initializer:
        if ".lora_" in init.name:
            if init.data_type != onnx.TensorProto.FLOAT:
                raise ExportError(f"the model builder quantized the LoRA weight {init.name}: the run-time adapter "
                                  "needs them in fp32")
            weights[init.name] = numpy_helper.to_array(init).copy()
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(weights[init.name]), init.name))
            graph.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if not weights:
        raise ExportError("the exported graph has no LoRA weights to turn into a run-time adapter")
    # Each LoRA update (the builder adds it to the projection: ".../lora/Add") is scaled per row, so base and tuned
    # rows decode in one batch; the input's default of 1 leaves a batch that is all one kind as it was.
    graph.graph.input.append(helper.make_tensor_value_info(ROW_SCALE, onnx.TensorProto.FLOAT, ["batch_size", 1, 1]))
    graph.graph.initializer.append(numpy_helper.from_array(np.ones((1, 1, 1), dtype=np.float32), ROW_SCALE))
    nodes = []
    for node in graph.graph.node:
        if node.op_type == "Add" and node.name.endswith("/lora/Add"):
            update = next(i for i, name in enumerate(node.input) if "lora_B" in name)
            scaled = f"{node.input[update]}/row_scaled"
            nodes.append(helper.make_node("Mul", [node.input[update], ROW_SCALE], [scaled], name=f"{node.name}/RowScale"))
            node.input[update] = scaled
        nodes.append(node)
    if sum(node.op_type == "Mul" and node.name.endswith("/RowScale") for node in nodes) != len(weights) // 2:
        raise ExportError("the exported graph's LoRA updates are not where the per-row scale expects them")
    graph.graph.ClearField("node")
    graph.graph.node.extend(nodes)
    for path in model_dir.glob("model.onnx*"):
        path.unlink()
    onnx.save(graph, str(graph_path), save_as_external_data=True, location="model.onnx.data")
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(w) for name, w in weights.items()})
    adapter.export_adapter(str(model_dir / ADAPTER_FILE))


def export_onnx(chat: ChatModel, precision: str = "fp32") -> Path:
    """Build (once) the ONNX export of the chat model and its LoRA adapter; returns the cached folder.

    The export is written to a sibling folder and renamed into place last, so a crash never leaves a half-written
    export behind; the manifest names the sources' checksum, builder version and precision (with its quantization
    options: variants of one precision are cached side by side).
    """
    base, options = parse_precision(precision)  # ExportError for an unknown name
    if chat.prompt_learning:
        raise ExportError("prompt-tuning adapters have no ONNX export; they decode with transformers")
    if chat.config.model_type not in EXPORTABLE_TYPES:
        raise ExportError(f"{chat.config.model_type} models are not exported to ONNX here")
    manifest = export_manifest(chat, precision)
    target = export_dir(manifest)
    if (target / MANIFEST_FILE).exists():
        return target
    logger.info("Exporting %s to ONNX (%s) at %s; once, takes about a minute", chat.base_model, manifest["precision"],
                target)
    started = time.perf_counter()
    with atomic_folder(target) as tmp:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                   resolve_base_model(chat.base_model), "-o", str(tmp), "-p", base, "-e", "cpu",
                   "-c", str(tmp / "hf-cache")]
        extra = builder_options(chat, base, options)
        command += ["--extra_options", *extra, *([f"adapter_path={chat.adapter_path}"] if chat.adapter_path else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ExportError(f"the ONNX model builder failed: {done.stderr.strip()[-500:]}")
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
        if chat.adapter_path is not None:
            _runtime_adapter(tmp)
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target


def builder_version() -> str:
    """The installed onnxruntime-genai (its model builder makes the export); ExportError without it."""
    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError as err:
        raise ExportError("onnxruntime-genai is not installed (its model builder exports the model); "
                          "pip install onnxruntime-genai") from err


def load_onnx(chat: ChatModel, precision: str = "fp32") -> OnnxModel:
    """The ONNX export of `chat` (built on first use), loaded; raises ExportError with the reason otherwise."""
    path = export_onnx(chat, precision)
    manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    try:
        config = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))["model"]
        decoder = config["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()  # every core
        # Threads spin between a step's operators instead of sleeping: each of a step's few hundred operators
        # would otherwise wake them (README: Performance, "Spinning").
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.log_severity_level = 3  # not the warning that the LoRA inputs' zero defaults stay inputs
        session = ort.InferenceSession(str(path / decoder["filename"]), options, providers=["CPUExecutionProvider"])
        adapter = None
        if (path / ADAPTER_FILE).exists():
            # Copied into arrays that the OrtValues keep alive, rather than views of the file reader's buffers.
            weights = ort.AdapterFormat.read_adapter(str(path / ADAPTER_FILE)).get_parameters()
            adapter = {name: ort.OrtValue.ortvalue_from_numpy(value.numpy().copy()) for name, value in weights.items()}
        past = [decoder["inputs"][f"past_{kind}_names"] % layer
                for layer in range(decoder["num_hidden_layers"]) for kind in ("key", "value")]
        kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
    except Exception as err:  # a corrupt export: the caller falls back; the next start rebuilds it
        shutil.rmtree(path, ignore_errors=True)
        raise ExportError(f"the cached ONNX export at {path} could not be loaded ({err}); it was removed") from err
    return OnnxModel(session, adapter, manifest, path, kv_shape, past, config["eos_token_id"], config["vocab_size"])


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


def _onnx_logits(onnx: OnnxModel, ids: Sequence[int], start: int, adapter: bool) -> torch.Tensor:
    """The ONNX export's next-token logits for ids[start:], read as the served path reads them.

    The prompt ids[:start] in one call, then one token per call: the export's LM head scores the last position only.
    """
    decode = onnx.decode([(ids[:start], adapter)], len(ids) - start)
    rows = [decode.prefill()] + [decode.step([token], [True]) for token in ids[start:-1]]
    return torch.from_numpy(np.concatenate(rows))


def served_perplexity(chat: ChatModel, onnx: OnnxModel, data_dir: str | None, limit: int = 200,
                      seed: int = DEFAULT_SEED, reference: dict | None = None) -> dict:
    """Held-out reply perplexity of the ONNX export next to the transformers model, base and tuned.

    Protocol: `limit` seeded test-split listener replies, the inference prompt without retrieval, loss on the
    reply tokens and their end-of-turn token; both engines score the same token ids.

    `reference` keeps transformers' losses by (token ids, adapter) between calls (several exports, one model).
    """
    from chatbot.data import load_examples
    from chatbot.prompts import encode_example

    reference = {} if reference is None else reference
    examples = [encode_example(chat.tokenizer, ex.history, ex.reply)
                for ex in load_examples(data_dir, "test", limit, seed)]

    def loss(logits: torch.Tensor, target: torch.Tensor) -> float:
        return -float(torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())

    systems = {}
    for system, adapter in (("base", False), ("tuned", True)):
        if adapter and not (chat.has_adapter and onnx.adapter is not None):
            continue
        totals = {"transformers": 0.0, "served": 0.0}
        tokens = 0
        for example in examples:
            start = next(i for i, label in enumerate(example.labels) if label != -100)
            ids = example.input_ids
            target = torch.tensor(ids[start:])
            key = (tuple(ids), adapter)
            if key not in reference:
                with torch.inference_mode(), adapter_state(chat, adapter):
                    logits = chat.model(input_ids=torch.tensor([ids], device=chat.model.device)).logits[0].float().cpu()
                reference[key] = loss(logits[start - 1:-1], target)
            totals["transformers"] += reference[key]
            totals["served"] += loss(_onnx_logits(onnx, ids, start, adapter), target)
            tokens += len(target)
        ppl = {name: math.exp(total / tokens) for name, total in totals.items()}
        systems[system] = {"transformers": round(ppl["transformers"], 4), "served": round(ppl["served"], 4),
                           "delta_pct": round(100 * (ppl["served"] / ppl["transformers"] - 1), 4), "tokens": tokens}
    return {"examples": len(examples), "seed": seed, "precision": onnx.manifest["precision"],
            "protocol": served_perplexity.__doc__.split("\n\n")[1].strip(), "systems": systems}
