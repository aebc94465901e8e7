"""EmpatheticChatbot: the facade the CLI, the app, training samples and evaluation share."""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from chatbot.data import SPEAKER, Turn
from chatbot.embeddings import embed, load_embedder
from chatbot.emotion import EmotionDetector, EmotionPrediction, load_emotion_detector
from chatbot.generation import DEFAULT_PRESET, PRESETS, GenerationSettings
from chatbot.models import DEFAULT_BASE_MODEL, ChatModel, ModelLoadError, default_adapter, load_chat_model
from chatbot.prompts import (
    DEFAULT_MAX_PROMPT_TOKENS,
    Prompt,
    build_prompt,
    clean_reply,
    first_sentences,
    history_from_messages,
)
from chatbot.retriever import IndexLoadError, RetrievedDialogue, Retriever, query_text
from chatbot.runtime import default_index_dir
from chatbot.safety import CRISIS_REPLY, SAFE_FALLBACK_REPLY, CrisisScreen, screen_reply

logger = logging.getLogger(__name__)

# System names used everywhere (app, API, eval.py): which model and whether retrieval is on.
SYSTEMS = {"base": (False, False), "base+rag": (False, True), "tuned": (True, False), "tuned+rag": (True, True)}
MAX_MESSAGE_CHARS = 2000  # longer messages are cut (and the reply says so): replies stay fast
DEFAULT_K = 3  # retrieved dialogues per prompt: more lengthen the prompt (and the wait) more than they help
EMPTY_MESSAGE_REPLY = "I'm here whenever you're ready. Tell me what's on your mind."
ERROR_REPLY = "I'm sorry, something went wrong on my side while replying. Could you say that again?"
STOP_STRINGS = ["Speaker:", "<|im_start|>"]


@dataclass
class Reply:
    """A reply and everything shown beside it."""

    text: str
    kind: str = "model"  # model | crisis | empty | fallback | error
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


def parse_system(name: str) -> tuple[bool, bool]:
    """(use_adapter, use_retrieval) for a system name, with a clear error for unknown names."""
    try:
        return SYSTEMS[name]
    except KeyError:
        raise ValueError(f"Unknown system {name!r}; choose from {', '.join(SYSTEMS)}") from None


def normalize_message(message: str) -> tuple[str, bool]:
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
    ):
        """Wire already loaded parts together; `from_pretrained` loads them by name."""
        self.chat = chat
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
    ) -> EmpatheticChatbot:
        """Load everything by name; a missing index or unfit adapter degrades with a note instead of failing."""
        base_model = base_model or DEFAULT_BASE_MODEL
        notes = []
        adapter_path = default_adapter() if adapter == "default" else (None if adapter in (None, "none") else adapter)
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
        return cls(chat, retriever, emotion, CrisisScreen(embedder), k=k, notes=notes, embedder=embedder)

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
        """Two systems' replies to the same message with the same settings and seed, as they grow."""
        left_reply = None
        for left_reply in self.stream(message, history, settings=settings, system=left):
            yield left_reply, Reply(text="", system=right, done=False)
        for right_reply in self.stream(message, history, settings=settings, system=right):
            yield left_reply, right_reply

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

    def stream(
        self,
        message: str,
        history: Sequence[Turn | dict] = (),
        use_retrieval: bool = True,
        settings: GenerationSettings | None = None,
        system: str | None = None,
    ) -> Iterator[Reply]:
        """Yield the reply as it grows; the last item has `done=True` and the final, screened text."""
        use_adapter, use_retrieval = parse_system(system) if system else (True, use_retrieval)
        system = system or ("tuned+rag" if use_retrieval else "tuned")
        settings = settings or PRESETS[DEFAULT_PRESET]
        turns = [t if isinstance(t, Turn) else None for t in history]
        turns = list(history) if all(turns) else history_from_messages(history)
        text, truncated = normalize_message(message)
        reply = Reply(text="", system=system, truncated_input=truncated)
        if truncated:
            reply.notes.append(f"Your message was shortened to its first {MAX_MESSAGE_CHARS} characters.")
        if not text:
            reply.kind, reply.text = "empty", EMPTY_MESSAGE_REPLY
            yield reply
            return
        previous = [t.text for t in turns if t.role == SPEAKER]
        if self.crisis is not None and self.crisis.check(text, previous).is_crisis:
            reply.kind, reply.text = "crisis", CRISIS_REPLY
            yield reply
            return
        reply.emotion, reply.retrieved = self.analyse(text, turns, use_retrieval)
        prompt = self.prompt_for(text, turns, reply.retrieved, reply.emotion.label if reply.emotion else None)
        reply.prompt_tokens = prompt.token_count
        reply.done = False
        partial = ""
        try:
            for partial in self._generate(prompt.text, settings, use_adapter):
                yield replace(reply, text=partial)  # a snapshot: consumers may keep every partial
        except Exception:  # the user gets an apology; the server keeps serving
            logger.exception("Generation failed")
            reply.kind, reply.text = "error", ERROR_REPLY
        else:
            reply.text = partial
            reason = screen_reply(reply.text)
            if reason:
                logger.info("Replaced a generated reply: %s", reason)
                reply.kind, reply.text = "fallback", SAFE_FALLBACK_REPLY
                reply.notes.append(f"The generated reply was replaced ({reason}).")
        reply.done = True
        yield reply

    def _generate(self, prompt_text: str, settings: GenerationSettings, use_adapter: bool) -> Iterator[str]:
        """Run `generate` in a worker thread and yield the cleaned text as tokens arrive."""
        tokenizer, model = self.chat.tokenizer, self.chat.model
        inputs = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(model.device)
        kwargs = dict(**inputs, **settings.generate_kwargs(), stop_strings=STOP_STRINGS, tokenizer=tokenizer)
        with self._lock:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            adapter_off = self.chat.has_adapter and not use_adapter
            context = model.disable_adapter() if adapter_off else nullcontext()
            with context, torch.inference_mode():
                if settings.num_beams > 1:  # beams cannot stream: yield the finished reply once
                    output = model.generate(**kwargs)
                    text = clean_reply(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]))
                    yield first_sentences(text, settings.max_sentences) or text
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
                raw, last = "", None
                try:
                    for piece in streamer:
                        raw += piece
                        text = clean_reply(raw)
                        enough = first_sentences(text, settings.max_sentences)
                        text = enough or text
                        if text != last and text:
                            last = text
                            yield text
                        if enough:
                            break
                finally:
                    # Also runs when the consumer stops early: the worker must finish before the lock is freed.
                    cancel.set()
                    worker.join()
                if errors:
                    raise errors[0]
                if last is None:
                    yield ""


class _Cancelled(StoppingCriteria):
    """Stops generation once the consumer has gone away (stop button, closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> bool:
        return self.event.is_set()
