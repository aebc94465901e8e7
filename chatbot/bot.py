"""EmpatheticChatbot: the facade the CLI, the app, training samples and evaluation share."""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from sentence_transformers import SentenceTransformer
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from chatbot.data import SPEAKER, Turn
from chatbot.decoding import (
    BASE_ADAPTER,
    DecodeLoop,
    ReplyText,
    quantized_copy,
    stop_token_ids,
    supports,
)
from chatbot.embeddings import embed, load_embedder
from chatbot.emotion import EmotionDetector, EmotionPrediction, load_emotion_detector
from chatbot.generation import DEFAULT_PRESET, PRESETS, GenerationSettings
from chatbot.models import (
    DEFAULT_BASE_MODEL,
    ChatModel,
    ModelLoadError,
    adapter_choice,
    is_prompt_learning,
    load_chat_model,
    virtual_token_inputs,
)
from chatbot.prompts import (
    DEFAULT_MAX_PROMPT_TOKENS,
    Prompt,
    build_prompt,
    history_from_messages,
)
from chatbot.retriever import IndexLoadError, RetrievedDialogue, Retriever, query_text
from chatbot.runtime import default_index_dir
from chatbot.safety import CRISIS_REPLY, SAFE_FALLBACK_REPLY, CrisisScreen, screen_reply
from chatbot.systems import get_system

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000  # longer messages are cut (and the reply says so): replies stay fast
DEFAULT_K = 3  # retrieved dialogues per prompt: more lengthen the prompt (and the wait) more than they help
EMPTY_MESSAGE_REPLY = "I'm here whenever you're ready. Tell me what's on your mind."
ERROR_REPLY = "I'm sorry, something went wrong on my side while replying. Could you say that again?"
STOP_STRINGS = ["Speaker:", "<|im_start|>"]
# model: generated text; crisis: the fixed safety reply; empty: nothing was typed; fallback: the output screen
# replaced the generated text; error: generation failed and the reply apologises.
ReplyKind = Literal["model", "crisis", "empty", "fallback", "error"]
QUANTIZE_ENV = "ED_QUANTIZE"  # "1": replies decoded by an int8 copy of the model (see chatbot.decoding); "0": fp32
# Off: `make bench` measured held-out perplexity +4.6% over fp32 (200 test replies), past the 1% we accept.
QUANTIZE_BY_DEFAULT = False


@dataclass
class Reply:
    """A reply and everything shown beside it."""

    text: str
    kind: ReplyKind = "model"
    emotion: EmotionPrediction | None = None
    retrieved: list[RetrievedDialogue] = field(default_factory=list)
    prompt_tokens: int = 0
    system: str = "tuned+rag"
    truncated_input: bool = False
    done: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def crisis(self) -> bool:
        """Whether this is the fixed crisis reply (never model text)."""
        return self.kind == "crisis"

    def to_dict(self) -> dict:
        """The JSON shape the CLI and the API print."""
        return {
            "reply": self.text,
            "kind": self.kind,
            "crisis": self.crisis,
            "emotion": self.emotion.to_dict() if self.emotion else None,
            "retrieved": [r.to_dict() for r in self.retrieved],
            "system": self.system,
            "prompt_tokens": self.prompt_tokens,
            "truncated_input": self.truncated_input,
            "notes": list(self.notes),
        }


def normalise_message(message: str) -> tuple[str, bool]:
    """Drop control characters and cap the length; returns (text, truncated)."""
    if not isinstance(message, str):
        raise TypeError(f"message must be a string, not {type(message).__name__}")
    text = "".join(ch for ch in message if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = text.strip()
    if len(text) > MAX_MESSAGE_CHARS:
        return text[:MAX_MESSAGE_CHARS].rsplit(" ", 1)[0], True
    return text, False


class EmpatheticChatbot:
    """Detects emotion, screens for crisis, retrieves similar dialogues and generates a streamed reply."""

    def __init__(
        self,
        chat: ChatModel,
        retriever: Retriever | None = None,
        emotion: EmotionDetector | None = None,
        crisis: CrisisScreen | None = None,
        k: int = DEFAULT_K,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        notes: Sequence[str] = (),
        embedder: SentenceTransformer | None = None,
        quantize: bool = False,
    ):
        """Wire already loaded parts together; `from_pretrained` loads them by name."""
        self.chat = chat
        # The model that writes replies: the chat model, or its int8 copy (3-4x fewer bytes read per token).
        # `chat.model` itself stays fp32, so perplexity and training never see quantized weights.
        self.generator = quantized_copy(chat.model) if quantize else chat.model
        self.quantized = quantize
        self._stop_ids = stop_token_ids(chat.model, chat.tokenizer)
        self.retriever = retriever
        # The one embedder, shared by retrieval, emotion and the crisis screen (None in model-only tests).
        self.embedder = embedder or (retriever.embedder if retriever else None) or (emotion.embedder if emotion else None)
        self.emotion = emotion
        self.crisis = crisis
        self.k = k
        self.max_prompt_tokens = max_prompt_tokens
        self.notes = list(notes)  # start-up problems the UI shows (no index, adapter refused, ...)
        # One model serves every request: generation and adapter switching must not interleave.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | None = None,
        adapter: str | os.PathLike | None = "default",
        index_dir: str | os.PathLike | None = None,
        device: str | None = None,
        k: int = DEFAULT_K,
        quantize: bool | None = None,
    ) -> EmpatheticChatbot:
        """Load everything by name; a missing index or unfit adapter degrades with a note instead of failing.

        `quantize` (default: $ED_QUANTIZE, else QUANTIZE_BY_DEFAULT; CPU only) decodes replies with an int8 copy.
        """
        base_model = base_model or DEFAULT_BASE_MODEL
        notes = []
        adapter_path = adapter_choice(adapter)
        try:
            chat = load_chat_model(base_model, adapter_path, device)
        except ModelLoadError as err:
            if adapter_path is None or adapter != "default":
                raise
            notes.append(f"Tuned adapter not used: {err}. Running the base model.")
            logger.warning(notes[-1])
            chat = load_chat_model(base_model, None, device)
        if chat.adapter_path is None:
            notes.append("No tuned adapter loaded: 'tuned' systems use the base model.")
        embedder = load_embedder(device=device)
        retriever = None
        try:
            retriever = Retriever(Path(index_dir) if index_dir else default_index_dir(), embedder)
        except IndexLoadError as err:
            notes.append(f"Retrieval is off: {err}")
            logger.warning(notes[-1])
        emotion = load_emotion_detector(embedder)
        if emotion is None:
            notes.append("Emotion detection is off: assets/emotion is missing (python -m chatbot.emotion).")
        if quantize is None:
            quantize = os.environ.get(QUANTIZE_ENV, "1" if QUANTIZE_BY_DEFAULT else "0") == "1"
            quantize = quantize and chat.model.device.type == "cpu"
        return cls(chat, retriever, emotion, CrisisScreen(embedder), k=k, notes=notes, embedder=embedder,
                   quantize=quantize)

    def enable_retrieval(self, index_dir: str | os.PathLike) -> None:
        """Load (or reload) the index, e.g. after it was built while the app was running."""
        self.retriever = Retriever(Path(index_dir), self.embedder)
        self.notes = [n for n in self.notes if not n.startswith("Retrieval is off")]

    def describe(self) -> dict:
        """What is loaded: base model, adapter, index and emotion classifier, for About pages and logs."""
        return {
            "base_model": self.chat.base_model,
            "adapter": str(self.chat.adapter_path) if self.chat.adapter_path else None,
            "adapter_metrics": self.chat.adapter_meta.get("metrics", {}),
            "index": dict(self.retriever.manifest, path=str(self.retriever.index_dir)) if self.retriever else None,
            "emotion_classifier": {k: v for k, v in self.emotion.manifest.items() if k != "labels"}
            if self.emotion else None,
            "k": self.k,
            "generation_weights": "int8 (dynamic quantization)" if self.quantized else str(self.chat.model.dtype),
            "notes": list(self.notes),
        }

    def compare_stream(
        self,
        message: str,
        left: str,
        right: str,
        history: Sequence[Turn | dict] = (),
        settings: GenerationSettings | None = None,
    ) -> Iterator[tuple[Reply, Reply]]:
        """Two systems' replies to the same message with the same settings and seed, as they grow (decoded together)."""
        prepared = [self._prepare(message, history, True, system) for system in (left, right)]
        for replies in self._stream_prepared(prepared, settings or PRESETS[DEFAULT_PRESET]):
            yield replies[0], replies[1]

    def respond_batch(
        self,
        dialogues: Sequence[tuple[str, Sequence[Turn | dict]]],
        use_retrieval: bool = True,
        settings: GenerationSettings | None = None,
        system: str | None = None,
    ) -> list[Reply]:
        """Complete replies to several independent (message, history) pairs, decoded as one batch (evaluation)."""
        prepared = [self._prepare(message, history, use_retrieval, system) for message, history in dialogues]
        *_, final = self._stream_prepared(prepared, settings or PRESETS[DEFAULT_PRESET])
        return final

    def _stream_prepared(
        self, prepared: Sequence[tuple[Reply, Prompt | None, bool]], settings: GenerationSettings
    ) -> Iterator[list[Reply]]:
        """Decode every prepared reply that needs the model together; yield them all as they grow, then final."""
        replies = [reply for reply, _, _ in prepared]
        rows = [i for i, (_, prompt, _) in enumerate(prepared) if prompt is not None]
        texts = {i: "" for i in rows}
        try:
            if rows:
                prompts, adapters = [prepared[i][1].text for i in rows], [prepared[i][2] for i in rows]
                for partials in self._generate(prompts, settings, adapters):
                    texts.update(zip(rows, partials))
                    # Snapshots: consumers may keep every partial.
                    yield [replace(r, text=texts[i]) if i in texts else r for i, r in enumerate(replies)]
        except Exception:  # every reply in the batch becomes an apology; the server keeps serving
            logger.exception("Generation failed")
            for i in rows:
                replies[i].kind, replies[i].text = "error", ERROR_REPLY
        else:
            for i in rows:
                self._finish(replies[i], texts[i])
        for reply in replies:
            reply.done = True
        yield replies

    def analyse(
        self, message: str, history: Sequence[Turn] = (), use_retrieval: bool = True
    ) -> tuple[EmotionPrediction | None, list[RetrievedDialogue]]:
        """Emotion and (optionally) the k most similar past dialogues, from one embedding of the last turns."""
        if self.embedder is None or (self.emotion is None and (self.retriever is None or not use_retrieval)):
            return None, []
        text = query_text([*history, Turn(SPEAKER, message)])
        vector = embed(self.embedder, [text])
        emotion = self.emotion.predict_batch([text], vector)[0] if self.emotion else None
        retrieved = self.retriever.search_vectors(vector, self.k)[0] if self.retriever and use_retrieval else []
        return emotion, retrieved

    def prompt_for(
        self, message: str, history: Sequence[Turn], retrieved: Sequence[RetrievedDialogue], emotion: str | None
    ) -> Prompt:
        """The prompt the model sees (built only by chatbot.prompts)."""
        return build_prompt(self.chat.tokenizer, message, history, retrieved, emotion, self.max_prompt_tokens)

    def respond(
        self,
        message: str,
        history: Sequence[Turn | dict] = (),
        use_retrieval: bool = True,
        settings: GenerationSettings | None = None,
        system: str | None = None,
    ) -> Reply:
        """The complete reply to `message` after `history`."""
        *_, final = self.stream(message, history, use_retrieval, settings, system)
        return final

    def _prepare(
        self, message: str, history: Sequence[Turn | dict], use_retrieval: bool, system: str | None
    ) -> tuple[Reply, Prompt | None, bool]:
        """Everything before the model: (reply so far, prompt or None when the reply is already final, use_adapter)."""
        chosen = get_system(system or ("tuned+rag" if use_retrieval else "tuned"))
        use_adapter, use_retrieval, system = chosen.adapter, chosen.retrieval, chosen.name
        turns = [t if isinstance(t, Turn) else None for t in history]
        turns = list(history) if all(turns) else history_from_messages(history)
        text, truncated = normalise_message(message)
        reply = Reply(text="", system=system, truncated_input=truncated)
        if truncated:
            reply.notes.append(f"Your message was shortened to its first {MAX_MESSAGE_CHARS} characters.")
        if not text:
            reply.kind, reply.text = "empty", EMPTY_MESSAGE_REPLY
            return reply, None, use_adapter
        try:
            prompt = self._screen_and_build(reply, text, turns, use_retrieval)
        except Exception:  # the user gets an apology; the server keeps serving
            logger.exception("Preparing a reply failed")
            reply.kind, reply.text = "error", ERROR_REPLY
            return reply, None, use_adapter
        if prompt is not None:
            reply.prompt_tokens = prompt.token_count
            reply.done = False
        return reply, prompt, use_adapter

    def _screen_and_build(self, reply: Reply, text: str, turns: list[Turn], use_retrieval: bool) -> Prompt | None:
        """Crisis screen, emotion and retrieval into `reply`, then the prompt (None: the crisis reply is final)."""
        previous = [t.text for t in turns if t.role == SPEAKER]
        if self.crisis is not None and self.crisis.check(text, previous).is_crisis:
            reply.kind, reply.text = "crisis", CRISIS_REPLY
            return None
        try:
            reply.emotion, reply.retrieved = self.analyse(text, turns, use_retrieval)
        except Exception:  # a reply without them beats no reply
            logger.exception("Emotion detection and retrieval failed")
            reply.notes.append("Emotion detection and retrieval failed for this message; the model replied without them.")
        return self.prompt_for(text, turns, reply.retrieved, reply.emotion.label if reply.emotion else None)

    @staticmethod
    def _finish(reply: Reply, text: str) -> None:
        """Set the final generated text, replaced by the safe fallback when screening rejects it."""
        reply.text = text
        reason = screen_reply(text)
        if reason:
            logger.info("Replaced a generated reply: %s", reason)
            reply.kind, reply.text = "fallback", SAFE_FALLBACK_REPLY
            reply.notes.append(f"The generated reply was replaced ({reason}).")

    def stream(
        self,
        message: str,
        history: Sequence[Turn | dict] = (),
        use_retrieval: bool = True,
        settings: GenerationSettings | None = None,
        system: str | None = None,
    ) -> Iterator[Reply]:
        """Yield the reply as it grows; the last item has `done=True` and the final, screened text."""
        prepared = [self._prepare(message, history, use_retrieval, system)]
        for (reply,) in self._stream_prepared(prepared, settings or PRESETS[DEFAULT_PRESET]):
            yield reply

    def _generate(
        self, prompt_texts: Sequence[str], settings: GenerationSettings, use_adapter: Sequence[bool]
    ) -> Iterator[list[str]]:
        """Yield every prompt's cleaned reply so far as they grow; one decode for all when the fast loop applies."""
        with self._lock:
            if supports(self.generator, settings):
                yield from self._decode(prompt_texts, settings, use_adapter)
                return
            # One after another: `generate` decodes one prompt (and one adapter state) at a time.
            texts = [""] * len(prompt_texts)
            for row, (prompt_text, adapter) in enumerate(zip(prompt_texts, use_adapter)):
                for text in self._generate_one(prompt_text, settings, adapter):
                    texts[row] = text
                    yield list(texts)

    def _adapter_context(self, use_adapter: bool) -> AbstractContextManager:
        """Switches the tuned adapter off for the base systems, in the fp32 model and its int8 copy alike."""
        stack = ExitStack()
        if self.chat.has_adapter and not use_adapter:
            for model in {id(m): m for m in (self.chat.model, self.generator)}.values():
                stack.enter_context(model.disable_adapter())
        return stack

    def _decode(
        self, prompt_texts: Sequence[str], settings: GenerationSettings, use_adapter: Sequence[bool]
    ) -> Iterator[list[str]]:
        """The fast path: decode all prompts in one batch (see chatbot.decoding.DecodeLoop)."""
        tokenizer = self.chat.tokenizer
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
        # Rows of one batch may differ in adapter state (Compare: base vs tuned): peft applies LoRA per row.
        adapter = getattr(self.generator, "active_adapter", None)
        names = [adapter if on else BASE_ADAPTER for on in use_adapter] if self.chat.has_adapter else None
        mixed = len(set(use_adapter)) > 1
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        # The prompt is read in fp32 even when decode steps run in int8 (see chatbot.decoding: activation outliers).
        loop = DecodeLoop(self.generator, prompts, settings, self._stop_ids, tokenizer.pad_token_id, names,
                          prefill_model=self.chat.model)
        replies = [ReplyText(settings.max_sentences) for _ in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        with nullcontext() if mixed else self._adapter_context(use_adapter[0]):
            for step in loop:
                changed = False
                for row, token in enumerate(step):
                    if token is None or token in self._stop_ids:
                        continue
                    generated[row].append(token)
                    # Decoding the whole reply each step keeps multi-token characters and merges right.
                    changed |= replies[row].set_raw(tokenizer.decode(generated[row])) is not None
                    if replies[row].done:
                        loop.finish(row)
                if changed:
                    yield [reply.shown or "" for reply in replies]
        if not any(reply.shown for reply in replies):  # nothing printable: still one (empty) result
            yield [""] * len(replies)

    def _generate_one(self, prompt_text: str, settings: GenerationSettings, use_adapter: bool) -> Iterator[str]:
        """The general path (beam search, prompt tuning): `generate` in a worker thread, text as tokens arrive."""
        # fp32: `generate` reads the prompt with the same model it decodes with (int8 is for decode steps only).
        tokenizer, model = self.chat.tokenizer, self.chat.model
        inputs = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(model.device)
        if is_prompt_learning(model):
            if use_adapter:
                inputs = virtual_token_inputs(model, inputs["input_ids"], inputs["attention_mask"])
            model = model.get_base_model()
        kwargs = dict(**inputs, **settings.generate_kwargs(), stop_strings=STOP_STRINGS, tokenizer=tokenizer)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with self._adapter_context(use_adapter), torch.inference_mode():
            if settings.num_beams > 1:  # beams cannot stream: yield the finished reply once
                output = model.generate(**kwargs)
                reply = ReplyText(settings.max_sentences)
                reply.set_raw(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]))
                yield reply.shown or ""
                return
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)
            cancel = threading.Event()
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    with torch.inference_mode():
                        model.generate(
                            **kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)])
                        )
                except BaseException as err:  # re-raised in the consumer
                    errors.append(err)
                    streamer.end()

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            reply = ReplyText(settings.max_sentences)
            try:
                for piece in streamer:
                    text = reply.add(piece)
                    if text is not None:
                        yield text
                    if reply.done:
                        break
            finally:
                # Also runs when the consumer stops early: the worker must finish before the lock is freed.
                cancel.set()
                worker.join()
            if errors:
                raise errors[0]
            if reply.shown is None:
                yield ""


class _Cancelled(StoppingCriteria):
    """Stops generation once the consumer has gone away (stop button, closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> bool:
        return self.event.is_set()
