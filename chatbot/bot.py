"""EmpatheticChatbot: the facade the CLI, the app, training samples and evaluation share."""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from chatbot.data import SPEAKER, Turn
from chatbot.embeddings import Embedder, embed, load_embedder
from chatbot.emotion import EmotionDetector, EmotionPrediction, load_emotion_detector, speaker_text
from chatbot.engine import (
    Decoder,
    ExportError,
    OnnxModel,
    OrtBackend,
    ReplyText,
    TorchBackend,
    adapter_state,
    candidate_rows,
    decoder_supports,
    load_onnx,
    stop_token_ids,
)
from chatbot.generation import DEFAULT_PRESET, PRESETS, GenerationSettings
from chatbot.metrics import is_echo
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
from chatbot.runtime import default_index_dir, engine_choice, get_device
from chatbot.safety import CONCERN_CHECK_IN, CRISIS_REPLY, SAFE_FALLBACK_REPLY, CrisisScreen, screen_reply
from chatbot.selector import ResponseSelector, load_response_selector
from chatbot.systems import System, get_system

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000  # longer messages are cut (and the reply says so): replies stay fast
DEFAULT_K = 3  # retrieved dialogues per prompt: more lengthen the prompt (and the wait) more than they help
EMPTY_MESSAGE_REPLY = "I'm here whenever you're ready. Tell me what's on your mind."
ERROR_REPLY = "I'm sorry, something went wrong on my side while replying. Could you say that again?"
STOP_STRINGS = ["Speaker:", "<|im_start|>"]


# model: generated text; concern: a model reply ending with a check-in line; crisis: the fixed safety reply;
# empty: nothing was typed; fallback: the output screen replaced the generated text; error: generation failed.
ReplyKind = Literal["model", "concern", "crisis", "empty", "fallback", "error"]
SELECT_CANDIDATES = 4  # generated candidates of a selecting system when the settings ask for one reply
REPLY_WORDS = (2, 60)  # a candidate shorter or longer than this (in words) is not shown


@dataclass
class Candidate:
    """One reply a selecting system weighed: generated, or a person's reply from a retrieved dialogue."""

    text: str
    source: Literal["generated", "retrieved"] = "generated"
    score: float | None = None  # the selector's score; None when it was not scored
    conv_id: str | None = None  # the retrieved dialogue it came from
    situation: str | None = None  # that dialogue's situation, for "Why this reply"
    rejected: str | None = None  # why it could not be shown (output screen, echo, length)

    def to_dict(self) -> dict:
        """The JSON shape of `candidates` in the CLI and the API."""
        return asdict(self)


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
    engine: str | None = None  # which engine wrote the text (None: no model ran)
    candidates: list[Candidate] = field(default_factory=list)  # the generated replies (and, selecting, retrieved)
    chosen: int | None = None  # index of the shown candidate

    @property
    def from_dataset(self) -> bool:
        """Whether the shown text is a person's reply from a retrieved dialogue, not model text."""
        return self.chosen is not None and self.candidates[self.chosen].source == "retrieved"

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
            "engine": self.engine,
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen,
        }


def clean_message(message: str) -> str:
    """Drop control characters and surrounding whitespace; the crisis screen reads this, before any cut."""
    if not isinstance(message, str):
        raise TypeError(f"message must be a string, not {type(message).__name__}")
    return "".join(ch for ch in message if ch in "\n\t" or unicodedata.category(ch)[0] != "C").strip()


def cut_message(text: str) -> tuple[str, bool]:
    """Cap a cleaned message at MAX_MESSAGE_CHARS (at a word boundary); returns (text, truncated)."""
    if len(text) > MAX_MESSAGE_CHARS:
        return text[:MAX_MESSAGE_CHARS].rsplit(" ", 1)[0], True
    return text, False


def normalise_message(message: str) -> tuple[str, bool]:
    """Drop control characters and cap the length; returns (text, truncated)."""
    return cut_message(clean_message(message))


@dataclass
class Prepared:
    """A reply after everything before the model: the prompt (None: the reply is already final) and its system."""

    reply: Reply
    prompt: Prompt | None = None
    system: System = field(default_factory=lambda: get_system("tuned+rag"))
    context: str = ""  # the dialogue so far as the selector reads it
    conversation: list[str] = field(default_factory=list)  # every turn's text, for the echo check


def unfit(text: str, conversation: Sequence[str]) -> str | None:
    """Why a candidate reply must not be shown (output screen, echo of the conversation, length), or None."""
    reason = screen_reply(text)
    if reason:
        return f"output screen: {reason}"
    if is_echo(text, conversation):
        return "repeats the conversation"
    count = len(text.split())
    if not REPLY_WORDS[0] <= count <= REPLY_WORDS[1]:
        return f"{count} words"
    return None


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
        embedder: Embedder | None = None,
        onnx: OnnxModel | None = None,
        selector: ResponseSelector | None = None,
    ):
        """Wire already loaded parts together; `from_pretrained` loads them by name."""
        self.chat = chat
        self.selector = selector  # ranks candidates for the selecting systems; None: the first fit one is shown
        self.onnx = onnx  # the served engine's export; None: every reply is decoded by transformers
        self._stop_ids = stop_token_ids(chat)
        self.retriever = retriever
        # The one embedder, shared by retrieval, emotion and the crisis screen (None in model-only tests).
        self.embedder = embedder or (retriever.embedder if retriever else None) or (emotion.embedder if emotion else None)
        self.emotion = emotion
        self.crisis = crisis
        self.k = k
        self.max_prompt_tokens = max_prompt_tokens
        self.notes = list(notes)  # start-up problems the UI shows (no index, adapter refused, ...)
        # The transformers model switches adapters in place: its decodes must not interleave. ONNX Runtime
        # generators are independent, so requests served by it run side by side.
        self._torch_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | None = None,
        adapter: str | os.PathLike | None = "default",
        index_dir: str | os.PathLike | None = None,
        device: str | None = None,
        k: int = DEFAULT_K,
        engine: str | None = None,
    ) -> EmpatheticChatbot:
        """Load everything by name; a missing index, unfit adapter or failed export degrades with a note instead.

        `engine` (default: $ED_ENGINE, else "onnx"): "onnx" serves replies from an ONNX Runtime export of
        the model (built once into the cache folder), "transformers" from the PyTorch model.
        """
        base_model = base_model or DEFAULT_BASE_MODEL
        notes = []
        adapter_path = adapter_choice(adapter)
        default_engine, precision = engine_choice()
        served_by_onnx = (engine or default_engine) == "onnx" and get_device(device).type == "cpu"

        def load_chat(lazy: bool) -> ChatModel:
            """The chat model; the shipped adapter, when it does not fit, gives way to the base model with a note."""
            nonlocal adapter_path
            try:
                return load_chat_model(base_model, adapter_path, device, lazy=lazy)
            except ModelLoadError as err:
                if adapter_path is None or adapter != "default":
                    raise
                notes.append(f"Tuned adapter not used: {err}. Running the base model.")
                logger.warning(notes[-1])
                adapter_path = None
                return load_chat_model(base_model, None, device, lazy=lazy)

        # Served by ONNX Runtime, the PyTorch weights are only needed for beam search: they load on first use.
        chat = load_chat(lazy=served_by_onnx)
        onnx_load = None
        if served_by_onnx:
            # Loading the served model is native work that releases the GIL: it runs while the embedder, index
            # and classifiers load here, which shortens every start.
            pool = ThreadPoolExecutor(1, thread_name_prefix="onnx-load")
            onnx_load = pool.submit(load_onnx, chat, precision)
            pool.shutdown(wait=False)  # the one task still runs; the thread ends after it
        embedder = load_embedder(device=device)
        retriever = None
        try:
            retriever = Retriever(Path(index_dir) if index_dir else default_index_dir(), embedder)
        except IndexLoadError as err:
            notes.append(f"Retrieval is off: {err}")
            logger.warning(notes[-1])
        emotion = load_emotion_detector(embedder)
        if emotion is None:
            notes.append("Emotion detection is off: assets/emotion is missing (python train_emotion.py).")
        selector = load_response_selector(embedder)
        if selector is None:
            notes.append("Reply selection is off: assets/selector is missing or unfit (python train_selector.py).")
        elif retriever is not None:
            selector.index_vectors(retriever)  # embedded on the first start with this index, then read from the cache
        crisis = CrisisScreen(embedder)
        onnx = None
        if onnx_load is not None:
            try:
                onnx = onnx_load.result()
            except ExportError as err:
                notes.append(f"Replies come from transformers (slower): {err}")
                logger.warning(notes[-1])
                chat = load_chat(lazy=False)  # every reply needs the PyTorch model now: load it at start
        if chat.adapter_path is None:
            notes.append("No tuned adapter loaded: 'tuned' systems use the base model.")
        return cls(chat, retriever, emotion, crisis, k=k, notes=notes, embedder=embedder, onnx=onnx, selector=selector)

    def enable_retrieval(self, index_dir: str | os.PathLike) -> None:
        """Load (or reload) the index, e.g. after it was built while the app was running."""
        self.retriever = Retriever(Path(index_dir), self.embedder)
        if self.selector is not None:
            self.selector.index_vectors(self.retriever)
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
            "engine": f"onnxruntime ({self.onnx.manifest['precision']})" if self.onnx else "transformers",
            "selector": f"{self.selector.manifest.get('kind', '?')} on {self.selector.manifest.get('embedder', '?')}"
            if self.selector else None,
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
        system: str | System | None = None,
    ) -> list[Reply]:
        """Complete replies to several independent (message, history) pairs, decoded as one batch (evaluation)."""
        prepared = [self._prepare(message, history, use_retrieval, system) for message, history in dialogues]
        *_, final = self._stream_prepared(prepared, settings or PRESETS[DEFAULT_PRESET])
        return final

    def _stream_prepared(
        self, prepared: Sequence[Prepared], settings: GenerationSettings
    ) -> Iterator[list[Reply]]:
        """Decode every prepared reply that needs the model together; yield them all as they grow, then final.

        While a selecting system's candidates grow, the first one is shown; the selector picks when all are done.
        """
        replies = [p.reply for p in prepared]
        rows = [i for i, p in enumerate(prepared) if p.prompt is not None]
        texts: dict[int, list[str]] = {i: [""] for i in rows}
        engine = self.engine_for(settings)
        try:
            if rows:
                prompts = [prepared[i].prompt.text for i in rows]
                adapters = [prepared[i].system.adapter for i in rows]
                counts = [max(settings.candidates, SELECT_CANDIDATES) if prepared[i].system.select
                          else settings.candidates for i in rows]
                for partials in self._generate(prompts, settings, adapters, counts):
                    texts.update(zip(rows, partials))
                    # Snapshots: consumers may keep every partial; the first candidate is the one shown.
                    yield [replace(r, text=texts[i][0], engine=engine) if i in texts else r
                           for i, r in enumerate(replies)]
        except Exception:  # every reply in the batch becomes an apology; the server keeps serving
            logger.exception("Generation failed")
            for i in rows:
                replies[i].kind, replies[i].text = "error", ERROR_REPLY
        else:
            for i in rows:
                replies[i].engine = engine
                replies[i].candidates = [Candidate(text) for text in texts[i]]
                replies[i].chosen = 0
                chosen = texts[i][0]
                if prepared[i].system.select:
                    chosen = self._select(replies[i], prepared[i].context, prepared[i].conversation)
                self._finish(replies[i], chosen)
        for reply in replies:
            reply.done = True
        yield replies

    def analyse(
        self, message: str, history: Sequence[Turn] = (), use_retrieval: bool = True
    ) -> tuple[EmotionPrediction | None, list[RetrievedDialogue]]:
        """Emotion (from the user's own turns) and, optionally, the k past dialogues most like the last turns."""
        if self.embedder is None or (self.emotion is None and (self.retriever is None or not use_retrieval)):
            return None, []
        dialogue = [*history, Turn(SPEAKER, message)]
        query, own = query_text(dialogue), speaker_text(dialogue)
        # One embedding call for both texts (one text when they are the same, as in a first message).
        texts = list(dict.fromkeys([query, own]))
        vectors = embed(self.embedder, texts)
        emotion = self.emotion.predict_batch([own], vectors[[texts.index(own)]])[0] if self.emotion else None
        retrieved = self.retriever.search_vectors(vectors[:1], self.k)[0] if self.retriever and use_retrieval else []
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
        self, message: str, history: Sequence[Turn | dict], use_retrieval: bool, system: str | System | None
    ) -> Prepared:
        """Everything before the model: the reply so far and, unless it is already final, its prompt."""
        chosen = system if isinstance(system, System) else get_system(system or self.default_system(use_retrieval))
        turns = [t if isinstance(t, Turn) else None for t in history]
        turns = list(history) if all(turns) else history_from_messages(history)
        whole = clean_message(message)
        text, truncated = cut_message(whole)
        reply = Reply(text="", system=chosen.name, truncated_input=truncated)
        if truncated:
            reply.notes.append(f"Your message was shortened to its first {MAX_MESSAGE_CHARS} characters.")
        if not text:
            reply.kind, reply.text = "empty", EMPTY_MESSAGE_REPLY
            return Prepared(reply, system=chosen)
        try:
            prompt = self._screen_and_build(reply, text, turns, chosen.retrieval, whole)
        except Exception:  # the user gets an apology; the server keeps serving
            logger.exception("Preparing a reply failed")
            reply.kind, reply.text = "error", ERROR_REPLY
            return Prepared(reply, system=chosen)
        if prompt is not None:
            reply.prompt_tokens = prompt.token_count
            reply.done = False
        dialogue = [*turns, Turn(SPEAKER, text)]
        return Prepared(reply, prompt, chosen, query_text(dialogue), [t.text for t in dialogue])

    def _screen_and_build(
        self, reply: Reply, text: str, turns: list[Turn], use_retrieval: bool, whole: str | None = None
    ) -> Prompt | None:
        """Crisis screen, emotion and retrieval into `reply`, then the prompt (None: the crisis reply is final).

        The screen reads the `whole` message, not the `text` cut for the model: a crisis sentence may come late.
        """
        previous = [t.text for t in turns if t.role == SPEAKER]
        screened = self.crisis.check(whole or text, previous) if self.crisis is not None else None
        if screened is not None and screened.is_crisis:
            reply.kind, reply.text = "crisis", CRISIS_REPLY
            return None
        if screened is not None and screened.is_concern:
            reply.kind = "concern"
        try:
            reply.emotion, reply.retrieved = self.analyse(text, turns, use_retrieval)
        except Exception:  # a reply without them beats no reply
            logger.exception("Emotion detection and retrieval failed")
            reply.notes.append("Emotion detection and retrieval failed for this message; the model replied without them.")
        return self.prompt_for(text, turns, reply.retrieved, reply.emotion.label if reply.emotion else None)

    @staticmethod
    def _finish(reply: Reply, text: str) -> None:
        """Set the final generated text, replaced by the safe fallback when screening rejects it.

        A `concern` reply keeps its kind either way and ends with the check-in line.
        """
        reply.text = text
        reason = screen_reply(text)
        if reason:
            logger.info("Replaced a generated reply: %s", reason)
            reply.kind, reply.text = "concern" if reply.kind == "concern" else "fallback", SAFE_FALLBACK_REPLY
            reply.notes.append(f"The generated reply was replaced ({reason}).")
        if reply.kind == "concern":
            reply.text = f"{reply.text}\n\n{CONCERN_CHECK_IN}"

    def _select(self, reply: Reply, context: str, conversation: Sequence[str]) -> str:
        """Weigh the generated candidates and the retrieved listener replies; the selector's best fit one wins."""
        reply.candidates += [Candidate(r.response, "retrieved", conv_id=r.conv_id, situation=r.situation)
                             for r in reply.retrieved]
        for candidate in reply.candidates:
            candidate.rejected = unfit(candidate.text, conversation)
        fit = [i for i, candidate in enumerate(reply.candidates) if not candidate.rejected]
        if fit and self.selector is not None:
            # Replies retrieved from this bot's index have cached vectors: only the rest is embedded.
            known = self.selector.known_replies(self.retriever, reply.retrieved) if self.retriever is not None else {}
            scores = self.selector.score(context, [reply.candidates[i].text for i in fit], known)
            for i, score in zip(fit, scores):
                reply.candidates[i].score = round(score, 4)
            reply.chosen = max(fit, key=lambda i: reply.candidates[i].score)
        return reply.candidates[reply.chosen].text

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

    def default_system(self, use_retrieval: bool) -> str:
        """The system a message gets when none is named: with retrieval, the selecting one where a selector loaded."""
        if not use_retrieval:
            return "tuned"
        return "tuned+rag+select" if self.selector is not None else "tuned+rag"

    def engine_for(self, settings: GenerationSettings) -> str:
        """The engine that decodes replies with these settings."""
        return OrtBackend.name if self.onnx and decoder_supports(self.chat, settings) else TorchBackend.name

    def _generate(
        self, prompt_texts: Sequence[str], settings: GenerationSettings, use_adapter: Sequence[bool],
        counts: Sequence[int],
    ) -> Iterator[list[list[str]]]:
        """Yield every prompt's `counts[i]` cleaned candidates so far as they grow (one decode where it can)."""
        if self.engine_for(settings) == OrtBackend.name:
            yield from self._decode(prompt_texts, settings, use_adapter, counts)
            return
        with self._torch_lock:
            if decoder_supports(self.chat, settings):
                yield from self._decode(prompt_texts, settings, use_adapter, counts)
                return
            # One after another: `generate` decodes one prompt (and one adapter state) at a time.
            texts = [[""] for _ in prompt_texts]
            for row, (prompt_text, adapter) in enumerate(zip(prompt_texts, use_adapter)):
                for text in self._generate_one(prompt_text, settings, adapter):
                    texts[row] = [text]
                    yield [list(t) for t in texts]

    def _decode(
        self, prompt_texts: Sequence[str], settings: GenerationSettings, use_adapter: Sequence[bool],
        counts: Sequence[int],
    ) -> Iterator[list[list[str]]]:
        """Decode every prompt's candidates in one `Decoder` run on the served engine."""
        tokenizer = self.chat.tokenizer
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
        rows = [row for prompt, on, n in zip(prompts, use_adapter, counts)
                for row in candidate_rows(prompt, on, settings.updated(candidates=n))]
        if self.engine_for(settings) == OrtBackend.name:
            backend = OrtBackend(self.onnx, rows, settings.max_new_tokens)
        else:
            backend = TorchBackend(self.chat, rows)
        decoder = Decoder(backend, rows, settings, self._stop_ids, tokenizer.pad_token_id)
        replies = [ReplyText(settings.max_sentences) for _ in rows]
        generated: list[list[int]] = [[] for _ in rows]
        starts = [sum(counts[:i]) for i in range(len(counts))]

        def grouped() -> list[list[str]]:
            shown = [reply.shown or "" for reply in replies]
            return [shown[start:start + n] for start, n in zip(starts, counts)]

        try:
            for step in decoder:
                changed = False
                for row, token in enumerate(step):
                    if token is None or token in self._stop_ids:
                        continue
                    generated[row].append(token)
                    # Decoding the whole reply each step keeps multi-token characters and merges right.
                    changed |= replies[row].set_raw(tokenizer.decode(generated[row])) is not None
                    if replies[row].done:
                        decoder.finish(row)
                if changed:
                    yield grouped()
        finally:
            backend.close()
        if not any(reply.shown for reply in replies):  # nothing printable: still one (empty) result
            yield grouped()

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
        with adapter_state(self.chat, use_adapter), torch.inference_mode():
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
