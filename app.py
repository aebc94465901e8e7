"""Empathetic Chat: the Gradio web app (chat, side-by-side comparison, results) on the EmpatheticChatbot facade.

Run it with `python app.py` (see `python app.py --help`). The page never builds prompts or calls the model
itself: everything goes through `EmpatheticChatbot`, loaded once at start-up.
"""

import argparse
import csv
import html
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot.bot import MAX_MESSAGE_CHARS, SYSTEMS, EmpatheticChatbot, Reply, normalize_message
from chatbot.generation import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS, GenerationSettings
from chatbot.models import DEFAULT_ADAPTER_DIR
from chatbot.retriever import build_from_data
from chatbot.runtime import ASSETS_DIR, PROJECT_ROOT, default_index_dir, limit_malloc_arenas
from chatbot.safety import RESOURCES_MARKDOWN

logger = logging.getLogger("app")

TITLE = "Empathetic Chat"
CSS_PATH = ASSETS_DIR / "ui" / "app.css"
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="rose")
CRISIS_TITLE = "⚠️ Safety message – crisis resources"
CONCERN_TITLE = "💬 Check-in – crisis resources"
EXAMPLES = [
    "I had such a hard day at work today. Things keep piling up.",
    "My dog died today. I am so distraught.",
    "I finally got the job offer I was hoping for!",
    "My best friend moved across the country and I really miss her.",
    "I heard strange noises downstairs last night and couldn't sleep.",
]
SYSTEM_LABELS = {
    "base": "Baseline",
    "base+rag": "Baseline + retrieval",
    "tuned": "Tuned",
    "tuned+rag": "RAG",
}
DEFAULT_LEFT, DEFAULT_RIGHT = "base", "tuned+rag"
COMPARE_HEADERS = ["Message", "Left system", "Left reply", "Right system", "Right reply"]
# History sent to the API is capped (the prompt only keeps the most recent turns anyway).
MAX_API_HISTORY_MESSAGES = 40
MAX_API_HISTORY_CHARS = 4000
QUEUE_SIZE = 32
# Every request body is capped: a message is cut to MAX_MESSAGE_CHARS anyway, and the page uploads no files.
# 512 KiB leaves room for a full API history (40 x 4000 characters) and refuses a 1 MB message outright.
MAX_REQUEST_BYTES = 512 * 1024
# The message boxes stop at this many characters: longer pastes are cut in the browser (the bot keeps fewer).
MAX_TYPED_CHARS = 10 * MAX_MESSAGE_CHARS
CONCURRENCY_LIMIT = 2
RETRIEVED_TITLE = "Retrieved dialogues (used for the latest reply)"
COMPARE_RETRIEVED_TITLE = "Retrieved dialogues (what the retrieval side saw)"


# ---------------------------------------------------------------------------------------------- helpers


def system_label(system: str) -> str:
    """How a system is named in the page, e.g. 'RAG (tuned+rag)'."""
    return f"{SYSTEM_LABELS.get(system, system)} ({system})"


def settings_from(preset: str, temperature: float, top_p: float, max_new_tokens: float, repetition_penalty: float,
                  num_beams: float) -> GenerationSettings:
    """The generation settings the sliders describe, on top of the chosen preset."""
    base = PRESETS.get(preset, PRESETS[DEFAULT_PRESET])
    return base.updated(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                        repetition_penalty=float(repetition_penalty), num_beams=int(num_beams))


def emotion_value(reply: Reply | None) -> dict[str, float] | None:
    """gr.Label value for the detected emotion of the latest message."""
    if reply is None or reply.emotion is None:
        return None
    return {reply.emotion.label: float(reply.emotion.score)}


def escape_text(text: str) -> str:
    """Text for markdown-rendered places (chat bubbles, notes): tags are shown as typed, never rendered or run."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def escape_md(text: object) -> str:
    """A value for a markdown table cell."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


class IndexBuild:
    """Builds the retrieval index in a background thread (first start of a Hugging Face Space)."""

    def __init__(self, bot: EmpatheticChatbot, index_dir: Path, data_dir: str | None = None):
        """Remember what to build; `start` runs it."""
        self.bot, self.index_dir, self.data_dir = bot, Path(index_dir), data_dir
        self.running, self.error = False, None
        self.thread: threading.Thread | None = None

    def start(self) -> "IndexBuild":
        """Start building in a daemon thread."""
        self.running = True
        self.thread = threading.Thread(target=self.run, name="index-build", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        """Build the index (downloading the data when needed) and switch retrieval on."""
        try:
            logger.info("Building the retrieval index at %s", self.index_dir)
            build_from_data(self.data_dir, self.index_dir, self.bot.embedder)
            self.bot.enable_retrieval(self.index_dir)
            logger.info("Retrieval index ready")
        except Exception as err:  # the app keeps serving without retrieval
            logger.exception("Building the retrieval index failed")
            self.error = str(err)
        finally:
            self.running = False


def start_index_build(bot: EmpatheticChatbot, env: dict | None = None, index_dir: Path | None = None,
                      data_dir: str | None = None) -> IndexBuild | None:
    """On a Space ($SPACE_ID set) without an index, build one in the background; otherwise do nothing."""
    env = os.environ if env is None else env
    if not env.get("SPACE_ID") or bot.retriever is not None or bot.embedder is None:
        return None
    return IndexBuild(bot, index_dir or default_index_dir(), data_dir).start()


def status_markdown(bot: EmpatheticChatbot, build: IndexBuild | None) -> str:
    """Start-up notes shown above the tabs (retrieval off, no adapter, index being built...)."""
    lines = []
    if build is not None and build.running:
        lines.append("⏳ **Building the retrieval index…** This happens once, on first start; "
                     "until it is ready, replies are generated without retrieved dialogues.")
    elif build is not None and build.error:
        lines.append(f"Building the retrieval index failed: {escape_text(build.error)}")
    for note in bot.notes:
        if build is not None and build.running and note.startswith("Retrieval is off"):
            continue
        lines.append(f"ℹ️ {escape_text(note)}")
    if bot.emotion is None:
        lines.append("ℹ️ Emotion detection is off: no emotion classifier at assets/emotion/ "
                     "(train it with `python -m chatbot.emotion`).")
    return "\n\n".join(lines)


def retrieved_html(reply: Reply | None, uses_retrieval: bool, bot: EmpatheticChatbot, build: IndexBuild | None,
                   grid: bool = False, title: str = RETRIEVED_TITLE) -> str:
    """The retrieved dialogues behind a reply as escaped HTML cards, or a one-line explanation."""
    head = f'<div class="ed-panel-title">{html.escape(title)}</div>'

    def empty(text: str) -> str:
        return f'{head}<div class="ed-empty">{html.escape(text)}</div>'

    if reply is None or reply.kind == "empty":
        return empty("The past dialogues retrieved for the latest reply appear here.")
    if reply.crisis:
        return empty("No dialogues are retrieved for safety messages.")
    if not uses_retrieval:
        return empty("Retrieval is off for this reply, so no past dialogues were used.")
    if not reply.retrieved:
        if bot.retriever is None and build is not None and build.running:
            return empty("Building the retrieval index… replies use past dialogues once it is ready.")
        if bot.retriever is None:
            return empty("No retrieval index is loaded (build one with `python build_index.py`), "
                         "so no past dialogues were used.")
        return empty("No similar past dialogues were found.")
    cards = []
    for rank, item in enumerate(reply.retrieved, start=1):
        width = max(0.0, min(1.0, float(item.score))) * 100
        said = "".join(f'<div class="ed-line"><span class="ed-who">Speaker:</span> {html.escape(line)}</div>'
                       for line in item.context.split("\n") if line.strip())
        cards.append(
            '<div class="ed-card">'
            '<div class="ed-card-head">'
            f'<span><span class="ed-rank">#{rank}</span> <span class="ed-emotion">{html.escape(item.emotion)}</span></span>'
            f'<span class="ed-score" title="cosine similarity">similarity {item.score:.2f}'
            f'<span class="ed-bar"><span style="width:{width:.0f}%"></span></span></span>'
            '</div>'
            f'<div class="ed-situation">Situation: {html.escape(item.situation)}</div>'
            f'{said}'
            f'<div class="ed-line"><span class="ed-who">Listener:</span> {html.escape(item.response)}</div>'
            '</div>'
        )
    return f'{head}<div class="ed-cards{" ed-grid" if grid else ""}">{"".join(cards)}</div>'


def notes_markdown(reply: Reply | None) -> str:
    """Notes about the latest reply (message shortened, reply replaced, errors)."""
    if reply is None:
        return ""
    notes = [escape_text(n) for n in reply.notes]
    if reply.kind == "empty":
        notes.insert(0, f"💬 {escape_text(reply.text)}")
    elif reply.kind == "error":
        notes.append("Something went wrong while generating that reply; you can simply try again.")
    return "\n\n".join(f"- {n}" for n in notes)


def crisis_banner(reply: Reply | None) -> dict:
    """The visible safety banner when the latest reply is the crisis message or carries a check-in line."""
    if reply is not None and reply.crisis:
        return gr.update(value=f"### {CRISIS_TITLE}\nThe last message looked like it might be about self-harm or "
                               f"suicide, so the chatbot's model was not used.\n\n{RESOURCES_MARKDOWN}", visible=True)
    if reply is not None and reply.kind == "concern":
        return gr.update(value=f"### {CONCERN_TITLE}\nThe model replied, and a check-in was added because the last "
                               f"message might be about self-harm or suicide.\n\n{RESOURCES_MARKDOWN}", visible=True)
    return gr.update(value="", visible=False)


def display_message(role: str, text: str, crisis: bool = False) -> dict:
    """A gr.Chatbot message: text escaped so HTML shows as typed; crisis replies carry a title."""
    message = {"role": role, "content": escape_text(text)}
    if crisis:
        message["metadata"] = {"title": CRISIS_TITLE}
    return message


def write_csv(rows: list[list[str]], folder: str) -> str:
    """Write the session's comparisons to a CSV file (cells that spreadsheets would run are quoted)."""
    path = Path(folder) / "comparisons.csv"

    def cell(value: str) -> str:
        return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COMPARE_HEADERS)
        writer.writerows([[cell(str(v)) for v in row] for row in rows])
    return str(path)


# ---------------------------------------------------------------------------------------------- the API


def check_system(name: object, which: str) -> str:
    """A known system name, or a clear gr.Error."""
    if not isinstance(name, str) or name not in SYSTEMS:
        raise gr.Error(f"Unknown {which} system {name!r}; choose one of: {', '.join(SYSTEMS)}", print_exception=False)
    return name


def check_message(message: object) -> str:
    """The message as a string, or a clear gr.Error."""
    if not isinstance(message, str):
        raise gr.Error(f"message must be a string, not {type(message).__name__}", print_exception=False)
    return message


def check_history(history: object) -> list[dict]:
    """Chat history as [{role: user|assistant, content: str}], or a clear gr.Error."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise gr.Error(f"history must be a list of {{role, content}} dicts, not {type(history).__name__}",
                       print_exception=False)
    checked = []
    for i, item in enumerate(history):
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant") \
                or not isinstance(item.get("content"), str):
            raise gr.Error(f"history[{i}] must be a dict with role 'user' or 'assistant' and a string content",
                           print_exception=False)
        checked.append({"role": item["role"], "content": item["content"][:MAX_API_HISTORY_CHARS]})
    return checked[-MAX_API_HISTORY_MESSAGES:]


def make_api(bot: EmpatheticChatbot) -> tuple[Callable, Callable]:
    """The two documented endpoints, as typed functions (gr.api derives their schema from the hints)."""

    def respond(message: str, history: list[dict] | None = None, use_retrieval: bool = True) -> tuple[str, str, list[dict]]:
        """Reply to `message` after `history` ([{"role": "user"|"assistant", "content": str}, ...]).

        Returns the reply text, the detected emotion label ("" when none) and the retrieved dialogues
        (a list of {score, emotion, situation, context, response, conv_id}).
        """
        message = check_message(message)
        history = check_history(history)
        if not isinstance(use_retrieval, bool):
            raise gr.Error(f"use_retrieval must be true or false, not {use_retrieval!r}", print_exception=False)
        reply = bot.respond(message, history, use_retrieval=use_retrieval)
        label = reply.emotion.label if reply.emotion else ""
        return reply.text, label, [r.to_dict() for r in reply.retrieved]

    def compare(message: str, left: str = DEFAULT_LEFT, right: str = DEFAULT_RIGHT) -> tuple[str, str]:
        """Two systems' replies to one message with the same settings and seed.

        Systems: "base", "base+rag", "tuned", "tuned+rag". Returns (left reply, right reply).
        """
        message = check_message(message)
        left, right = check_system(left, "left"), check_system(right, "right")
        *_, (left_reply, right_reply) = bot.compare_stream(message, left, right)
        return left_reply.text, right_reply.text

    return respond, compare


# ---------------------------------------------------------------------------------------------- the page


def build_demo(bot: EmpatheticChatbot, index_build: IndexBuild | None = None) -> gr.Blocks:
    """The whole app for an already loaded bot (tests pass a tiny one)."""
    default = PRESETS[DEFAULT_PRESET]
    private = {"api_visibility": "private"}

    def uses_retrieval(system: str) -> bool:
        return SYSTEMS[system][1]

    # ------------------------------------------------------------------ chat
    def run_chat(message: str, history: list[dict], use_retrieval: bool, *controls) -> Iterator[tuple]:
        settings = settings_from(*controls)
        history = list(history or [])
        text, _ = normalize_message(message or "")
        if not text:  # the facade answers an empty message without a model call
            reply = bot.respond(message or "", history, use_retrieval=use_retrieval, settings=settings)
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), notes_markdown(reply), gr.skip()
            return
        shown = [display_message(m["role"], m["content"], m.get("crisis", False)) for m in history]
        shown.append(display_message("user", text))
        yield "", shown, history, gr.skip(), gr.skip(), "", crisis_banner(None)
        reply = None
        with closing(bot.stream(message, history, use_retrieval=use_retrieval, settings=settings)) as replies:
            for n, reply in enumerate(replies):
                turn = [{"role": "user", "content": text},
                        {"role": "assistant", "content": reply.text, "crisis": reply.crisis}]
                bubbles = [*shown, display_message("assistant", reply.text, reply.crisis)]
                if n == 0 or reply.done:
                    yield (gr.skip(), bubbles, history + turn, emotion_value(reply),
                           retrieved_html(reply, use_retrieval, bot, index_build), notes_markdown(reply),
                           crisis_banner(reply))
                else:
                    yield gr.skip(), bubbles, history + turn, gr.skip(), gr.skip(), gr.skip(), gr.skip()

    def clear_chat() -> tuple:
        return [], [], None, retrieved_html(None, True, bot, index_build), "", crisis_banner(None), ""

    def apply_preset(name: str) -> tuple:
        chosen = PRESETS.get(name, default)
        return (gr.update(value=chosen.temperature, interactive=chosen.do_sample),
                gr.update(value=chosen.top_p, interactive=chosen.do_sample),
                chosen.max_new_tokens, chosen.repetition_penalty, chosen.num_beams,
                f"*{PRESET_DESCRIPTIONS.get(name, '')}*")

    # ------------------------------------------------------------------ compare
    def run_compare(message: str, left: str, right: str, table: dict, *controls) -> Iterator[tuple]:
        settings = settings_from(*controls)
        left, right = check_system(left, "left"), check_system(right, "right")
        text, _ = normalize_message(message or "")
        if not text:
            reply = bot.respond(message or "", settings=settings, system=left)
            yield gr.skip(), gr.skip(), gr.skip(), notes_markdown(reply), gr.skip(), gr.skip(), gr.skip()
            return
        rag_side = right if uses_retrieval(right) else left if uses_retrieval(left) else None
        pair = (None, None)
        yield "", "", compare_panel(None, None), "", gr.skip(), gr.skip(), gr.skip()
        with closing(bot.compare_stream(message, left, right, settings=settings)) as pairs:
            for pair in pairs:
                yield pair[0].text, pair[1].text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        left_reply, right_reply = pair
        if left_reply is None:
            return
        panel = compare_panel(right_reply if rag_side == right else left_reply, rag_side)
        rows = table["rows"] + [[text, left, left_reply.text, right, right_reply.text]]
        folder = table.get("folder") or tempfile.mkdtemp(prefix="empathetic-chat-")
        path = write_csv(rows, folder)
        notes = notes_markdown(left_reply)
        extra = [f"- {escape_text(n)}" for n in right_reply.notes if n not in left_reply.notes]
        notes = "\n\n".join([notes, *extra]).strip()
        yield (left_reply.text, right_reply.text, panel, notes, {"rows": rows, "folder": folder}, rows,
               gr.update(value=path, visible=True))

    def compare_panel(reply: Reply | None, rag_side: str | None) -> str:
        if reply is not None and rag_side is None:
            return (f'<div class="ed-panel-title">{COMPARE_RETRIEVED_TITLE}</div>'
                    '<div class="ed-empty">Neither system uses retrieval, so no past dialogues were used.</div>')
        return retrieved_html(reply, True, bot, index_build, grid=True, title=COMPARE_RETRIEVED_TITLE)

    def relabel(system: str, side: str) -> dict:
        return gr.update(label=f"{side}: {system_label(system)}")

    with gr.Blocks(title=TITLE) as demo:
        # The documented API first, so the two endpoints keep their plain names.
        respond_api, compare_api = make_api(bot)
        gr.api(respond_api, api_name="respond")
        gr.api(compare_api, api_name="compare")

        gr.Markdown(
            f"# 💬 {TITLE}\n"
            "A small language model that listens and answers with empathy, helped by similar conversations from "
            "the Empathetic Dialogues data set. *A research demo, not a therapist.*",
            elem_classes="ed-header",
        )
        start_status = status_markdown(bot, index_build)
        status = gr.Markdown(start_status, visible=bool(start_status), elem_classes="ed-status")
        timer = gr.Timer(5, active=bool(index_build and index_build.running))

        with gr.Tab("Chat", id="chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=380):
                    chatbot = gr.Chatbot(
                        label="Conversation", height=480, layout="bubble", sanitize_html=True,
                        allow_tags=False, buttons=["copy"], feedback_options=None, elem_id="chatbot",
                        placeholder="Tell me about something that happened to you, and how it made you feel.",
                    )
                    banner = gr.Markdown(visible=False, elem_classes="ed-crisis", elem_id="crisis-banner")
                    with gr.Row(equal_height=True):
                        message = gr.Textbox(
                            placeholder="Type a message and press Enter…", show_label=False, scale=6,
                            lines=1, max_lines=6, autofocus=True, elem_id="message", container=False,
                            max_length=MAX_TYPED_CHARS,
                        )
                        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                        clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
                    gr.Examples(EXAMPLES, inputs=[message], label="Examples")
                    use_retrieval = gr.Checkbox(
                        value=True, label="Use retrieval (similar past dialogues)", elem_id="use-retrieval",
                        info="Off: the model answers without looking at Empathetic Dialogues conversations.",
                    )
                    with gr.Accordion("Generation settings", open=False):
                        preset = gr.Dropdown(list(PRESETS), value=DEFAULT_PRESET, label="Preset",
                                             info="Choosing a preset sets the sliders below.")
                        preset_info = gr.Markdown(f"*{PRESET_DESCRIPTIONS.get(DEFAULT_PRESET, '')}*")
                        with gr.Row():
                            temperature = gr.Slider(0.05, 1.5, value=default.temperature, step=0.05,
                                                    label="Temperature", interactive=default.do_sample)
                            top_p = gr.Slider(0.05, 1.0, value=default.top_p, step=0.05, label="Top-p",
                                              interactive=default.do_sample)
                        with gr.Row():
                            max_new_tokens = gr.Slider(8, 256, value=default.max_new_tokens, step=4,
                                                       label="Max new tokens")
                            repetition_penalty = gr.Slider(1.0, 2.0, value=default.repetition_penalty, step=0.05,
                                                           label="Repetition penalty")
                            num_beams = gr.Slider(1, 5, value=default.num_beams, step=1, label="Beams",
                                                  info="more than 1: beam search (replies appear at once)")
                with gr.Column(scale=2, min_width=300):
                    emotion = gr.Label(label="Detected emotion (latest message)" if bot.emotion is not None
                                       else "Detected emotion (off: no emotion classifier loaded)", elem_id="emotion")
                    notes = gr.Markdown(elem_classes="ed-notes", elem_id="notes")
                    retrieved = gr.HTML(retrieved_html(None, True, bot, index_build), elem_id="retrieved",
                                        js_on_load=None)
            history = gr.State([])

        controls = [preset, temperature, top_p, max_new_tokens, repetition_penalty, num_beams]

        with gr.Tab("Compare", id="compare"):
            gr.Markdown("One message, two replies side by side, from the same generation settings and seed "
                        "(set them under *Generation settings* on the Chat tab).")
            with gr.Row(equal_height=True):
                compare_message = gr.Textbox(placeholder="A message to compare replies on…", show_label=False,
                                             scale=6, lines=1, max_lines=6, elem_id="compare-message",
                                             container=False, max_length=MAX_TYPED_CHARS)
                compare_button = gr.Button("Compare", variant="primary", scale=1, min_width=100,
                                           elem_id="compare-button")
                compare_stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
            gr.Examples(EXAMPLES[:3], inputs=[compare_message], label="Examples")
            with gr.Row():
                with gr.Column():
                    left = gr.Dropdown(list(SYSTEMS), value=DEFAULT_LEFT, label="Left system", elem_id="left-system")
                    left_reply = gr.Textbox(label=f"Left: {system_label(DEFAULT_LEFT)}", lines=6, max_lines=14,
                                            interactive=False, buttons=["copy"], elem_id="left-reply",
                                            placeholder="The left system's reply appears here.")
                with gr.Column():
                    right = gr.Dropdown(list(SYSTEMS), value=DEFAULT_RIGHT, label="Right system",
                                        elem_id="right-system")
                    right_reply = gr.Textbox(label=f"Right: {system_label(DEFAULT_RIGHT)}", lines=6, max_lines=14,
                                             interactive=False, buttons=["copy"], elem_id="right-reply",
                                             placeholder="The right system's reply appears here (after the left).")
            compare_notes = gr.Markdown(elem_classes="ed-notes")
            compare_retrieved = gr.HTML(compare_panel(None, None), elem_id="compare-retrieved", js_on_load=None)
            with gr.Accordion("Comparisons made this session", open=True):
                table = gr.Dataframe(headers=COMPARE_HEADERS, value=[], datatype="str", interactive=False, wrap=True,
                                     elem_id="comparisons", column_widths=["22%", "9%", "30%", "9%", "30%"])
                download = gr.DownloadButton("Download CSV", visible=False, size="sm", elem_id="download-csv")
            table_state = gr.State({"rows": [], "folder": None})

        with gr.Tab("Results & About", id="about"):
            about_tab(bot)

        # ------------------------------------------------------------------ events (private: the API is above)
        chat_inputs = [message, history, use_retrieval, *controls]
        chat_outputs = [message, chatbot, history, emotion, retrieved, notes, banner]
        submitted = message.submit(run_chat, chat_inputs, chat_outputs, show_progress="minimal", **private)
        clicked = send.click(run_chat, chat_inputs, chat_outputs, show_progress="minimal", **private)
        stop.click(None, cancels=[submitted, clicked], **private)
        cleared = [chatbot, history, emotion, retrieved, notes, banner, message]
        clear.click(clear_chat, None, cleared, queue=False, **private)
        chatbot.clear(clear_chat, None, cleared, queue=False, **private)  # the chat's own trash-can button
        preset.change(apply_preset, preset, [temperature, top_p, max_new_tokens, repetition_penalty, num_beams,
                                             preset_info], queue=False, **private)

        compare_inputs = [compare_message, left, right, table_state, *controls]
        compare_outputs = [left_reply, right_reply, compare_retrieved, compare_notes, table_state, table, download]
        compared = compare_button.click(run_compare, compare_inputs, compare_outputs, **private)
        compared_submit = compare_message.submit(run_compare, compare_inputs, compare_outputs, **private)
        compare_stop.click(None, cancels=[compared, compared_submit], **private)
        left.change(lambda s: relabel(s, "Left"), left, left_reply, queue=False, **private)
        right.change(lambda s: relabel(s, "Right"), right, right_reply, queue=False, **private)

        def refresh_status() -> tuple:
            text = status_markdown(bot, index_build)
            return gr.update(value=text, visible=bool(text)), gr.Timer(active=bool(index_build and index_build.running))

        timer.tick(refresh_status, None, [status, timer], **private)

    # One model serves everyone (the bot serialises generation); requests beyond the queue size are turned away.
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def about_tab(bot: EmpatheticChatbot) -> None:
    """Figures, evaluation results, models in use, data licence and the disclaimer."""

    def figure(path: Path, label: str, missing: str) -> None:
        if path.exists():
            gr.Markdown(f"### {label}")
            gr.Image(str(path), label=label, interactive=False, show_label=False, buttons=["fullscreen"])
        else:
            gr.Markdown(f"**{label}** is missing: `{path.relative_to(ASSETS_DIR.parent)}` does not exist yet. "
                        f"{missing}", elem_classes="ed-missing")

    gr.Markdown("## Results")
    with gr.Row():
        with gr.Column():
            figure(ASSETS_DIR / "figures" / "emotion_distribution.png", "Emotions in the training data",
                   "It is produced by the data exploration step.")
        with gr.Column():
            adapter = bot.chat.adapter_path
            figure((adapter or DEFAULT_ADAPTER_DIR) / "loss.png", "Training loss of the tuned adapter",
                   "Train the adapter with `python train.py` to produce it.")
    results_md = ASSETS_DIR / "results" / "results.md"
    if results_md.exists():
        gr.Markdown("### Evaluation")
        gr.Markdown(results_md.read_text(encoding="utf-8"))
    else:
        gr.Markdown("**Evaluation table** is missing: `assets/results/results.md` does not exist yet. "
                    "Run `python eval.py` to produce it.", elem_classes="ed-missing")
    charts = sorted((ASSETS_DIR / "results").glob("*.png"))
    if charts:
        with gr.Row():
            for chart in charts:
                with gr.Column():
                    gr.Markdown(f"### {chart.stem.replace('_', ' ').capitalize()}")
                    gr.Image(str(chart), label=chart.stem, interactive=False, show_label=False,
                             buttons=["fullscreen"])
    else:
        gr.Markdown("**Evaluation chart** is missing: no `assets/results/*.png` yet. "
                    "Run `python eval.py` to produce it.", elem_classes="ed-missing")

    methods_md = ASSETS_DIR / "results" / "training" / "results.md"
    if methods_md.exists():  # eval.py --perplexity-only over every shipped adapter
        gr.Markdown("### Fine-tuning methods: base, prompt tuning and LoRA, with and without retrieval")
        gr.Markdown(methods_md.read_text(encoding="utf-8"))

    gr.Markdown("## Models in use")
    gr.Markdown(models_markdown(bot.describe()))

    gr.Markdown(
        "## Data\n"
        "Retrieval, fine-tuning and emotion detection use **Empathetic Dialogues** (Facebook AI Research), "
        "licensed under [CC BY-NC 4.0](https://creativecommons.org/licenses/by-nc/4.0/): non-commercial use only, "
        "with attribution. The retrieved dialogues shown in the app are quotes from it.\n\n"
        "> Hannah Rashkin, Eric Michael Smith, Margaret Li and Y-Lan Boureau. 2019. "
        "*Towards Empathetic Open-domain Conversation Models: a New Benchmark and Dataset.* "
        "In Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics (ACL), "
        "pages 5370–5381."
    )
    gr.Markdown(
        "## Disclaimer\n"
        "**This is a research demo, not a therapist.** Its replies come from a small language model: they can be "
        "wrong, odd or unhelpful, and they are no substitute for professional help. Messages that look like a "
        "crisis get a fixed safety message instead of a model reply, but the screen can miss things.\n\n"
        f"If you are struggling or thinking about suicide or self-harm:\n{RESOURCES_MARKDOWN}",
        elem_classes="ed-disclaimer",
    )


def models_markdown(info: dict) -> str:
    """The models and index in use (from `bot.describe()`) as a markdown table."""
    index = info.get("index")
    emotion = info.get("emotion_classifier")
    metrics = info.get("adapter_metrics") or {}
    rows = [
        ("Base model", info.get("base_model")),
        ("Tuned adapter", info.get("adapter") or "none (the 'tuned' systems use the base model)"),
    ]
    if metrics:
        rows.append(("Adapter metrics", ", ".join(f"{k}: {v}" for k, v in metrics.items())))
    if index:
        rows.append(("Retrieval index", f"{index.get('count', '?')} dialogues, built {index.get('built_at', '?')} "
                                        f"with {index.get('embedder', '?')} ({index.get('index_type', '?')})"))
    else:
        rows.append(("Retrieval index", "none loaded (build it with `python build_index.py`)"))
    rows.append(("Dialogues retrieved per reply", info.get("k")))
    if emotion:
        accuracy = emotion.get("test_accuracy_first_turn")
        shown = f"{accuracy:.1%} accuracy on the test split (first speaker turn, 32 labels)" \
            if isinstance(accuracy, (int, float)) else "accuracy not recorded"
        rows.append(("Emotion classifier", f"{emotion.get('embedder', '?')} + linear layer, {shown}"))
    else:
        rows.append(("Emotion classifier", "none (train it with `python -m chatbot.emotion`)"))
    lines = ["| Part | In use |", "|---|---|"]
    lines += [f"| {escape_md(name)} | {escape_md(value)} |" for name, value in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- start-up


class BodySizeLimit:
    """ASGI middleware that refuses request bodies over `max_bytes` with 413, before the app reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES):
        """Wrap `app`."""
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared length first; count the bytes of bodies sent without one."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self.refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            # A chunked body that grows too large ends as if the client had gone away.
            return {"type": "http.disconnect"} if seen > self.max_bytes else message

        await self.app(scope, counted, send)

    async def refuse(self, send: Send) -> None:
        """Answer 413 with a JSON detail that says what the limit is."""
        body = (f'{{"detail": "Request body too large: the limit is {self.max_bytes // 1024} KiB '
                f'(messages are cut to {MAX_MESSAGE_CHARS} characters anyway)."}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def blocked_paths() -> list[str]:
    """Everything in the project except assets/: never served, even if GRADIO_ALLOWED_PATHS were set."""
    return sorted(str(path) for path in PROJECT_ROOT.iterdir() if path.name != ASSETS_DIR.name)


def launch_options() -> dict:
    """Theme, style and limits every launch uses (Gradio 6 takes them in `launch`, not in `Blocks`)."""
    return {"theme": THEME, "css_paths": [CSS_PATH], "footer_links": ["api", "gradio"],
            "max_file_size": MAX_REQUEST_BYTES, "blocked_paths": blocked_paths(),
            "app_kwargs": {"middleware": [Middleware(BodySizeLimit, max_bytes=MAX_REQUEST_BYTES)]}}


def launch_kwargs(args: argparse.Namespace) -> dict:
    """All `demo.launch` arguments for the command-line flags."""
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    return {"server_name": args.host, "server_port": args.port, "share": args.share, "auth": auth,
            **launch_options()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (host, port, share, auth)."""
    parser = argparse.ArgumentParser(description="Run the Empathetic Chat web app.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port to listen on (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--auth", default=os.environ.get("ED_AUTH"),
                        help="require a login, given as user:password (default: $ED_AUTH; none when unset)")
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth must look like user:password")
    return args


def load_bot() -> EmpatheticChatbot:
    """The one chatbot the app serves, loaded once at start-up."""
    return EmpatheticChatbot.from_pretrained()


if __name__ == "__main__":  # flags first, so --help and typos answer without loading the model
    CLI = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

limit_malloc_arenas()  # before the model and the worker threads allocate: memory stays flat under load
BOT = load_bot()
INDEX_BUILD = start_index_build(BOT)
demo = build_demo(BOT, INDEX_BUILD)

if __name__ == "__main__":
    demo.launch(**launch_kwargs(CLI))
