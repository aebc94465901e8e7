"""The page: Chat, Compare and Results & About tabs, and the handlers behind them, on an already loaded bot."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import gradio as gr

from chatbot.bot import MAX_MESSAGE_CHARS, EmpatheticChatbot, Reply, normalise_message
from chatbot.generation import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS, GenerationSettings
from chatbot.models import DEFAULT_ADAPTER_DIR
from chatbot.runtime import ASSETS_DIR, cpu_threads
from chatbot.safety import RESOURCES_MARKDOWN
from chatbot.systems import SYSTEMS
from chatbot.web import render
from chatbot.web.api import DEFAULT_LEFT, DEFAULT_RIGHT, check_system, make_api
from chatbot.web.server import IndexBuild

TITLE = "Empathetic Chat"
EXAMPLES = [
    "I had such a hard day at work today. Things keep piling up.",
    "My dog died today. I am so distraught.",
    "I finally got the job offer I was hoping for!",
    "My best friend moved across the country and I really miss her.",
    "I heard strange noises downstairs last night and couldn't sleep.",
]
# The generation-settings sliders, one per GenerationSettings field, in rows: (minimum, maximum, step, label).
SLIDER_ROWS = [
    {"temperature": (0.05, 1.5, 0.05, "Temperature"), "top_p": (0.05, 1.0, 0.05, "Top-p")},
    {"max_new_tokens": (8, 256, 4, "Max new tokens"), "repetition_penalty": (1.0, 2.0, 0.05, "Repetition penalty"),
     "num_beams": (1, 5, 1, "Beams")},
]
SAMPLING_ONLY = {"temperature", "top_p"}  # greyed out for presets that do not sample
# The message boxes stop at this many characters: longer pastes are cut in the browser (the bot keeps fewer).
MAX_TYPED_CHARS = 10 * MAX_MESSAGE_CHARS
QUEUE_SIZE = 32
# ONNX Runtime requests run side by side (chatbot.engine), one per core: with more, the decode threads starved the
# server's own event loop and clients timed out (README: Load).
CONCURRENCY_LIMIT = cpu_threads()


def chosen_settings(preset: str, sliders: dict[str, float]) -> GenerationSettings:
    """The preset with the sliders' values on top; each keeps its field's type (sliders send floats)."""
    base = PRESETS.get(preset, PRESETS[DEFAULT_PRESET])
    return base.updated(**{name: type(getattr(base, name))(value) for name, value in sliders.items()})


def build_demo(bot: EmpatheticChatbot, index_build: IndexBuild | None = None, preset: str = DEFAULT_PRESET) -> gr.Blocks:
    """The whole app for an already loaded bot (tests pass a tiny one); `preset` is the settings it opens with."""
    default = PRESETS[preset]
    private = {"api_visibility": "private"}  # page events stay off the API: /respond and /compare are the API

    def compare_panel(reply: Reply | None, uses_retrieval: bool = True) -> str:
        return render.retrieved_html(reply, uses_retrieval, bot, index_build, grid=True,
                                     title=render.COMPARE_RETRIEVED_TITLE)

    with gr.Blocks(title=TITLE) as demo:
        # The documented API first, so the two endpoints keep their plain names.
        respond_api, compare_api = make_api(bot)
        gr.api(respond_api, api_name="respond")
        gr.api(compare_api, api_name="compare")

        gr.Markdown(f"# {TITLE}\nA small language model that listens and answers with empathy, helped by similar "
                    "conversations from the Empathetic Dialogues data set. *A research demo, not a therapist.*",
                    elem_classes="ed-header")
        start_status = render.status_markdown(bot, index_build)
        status = gr.Markdown(start_status, visible=bool(start_status), elem_classes="ed-status")
        timer = gr.Timer(5, active=bool(index_build and index_build.running))

        with gr.Tab("Chat", id="chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=380):
                    chat = gr.Chatbot(
                        label="Conversation", height=480, layout="bubble", sanitize_html=True,
                        allow_tags=False, buttons=["copy"], feedback_options=None, elem_id="chatbot",
                        placeholder="Tell me about something that happened to you, and how it made you feel.",
                    )
                    banner = gr.Markdown(visible=False, elem_classes="ed-crisis", elem_id="crisis-banner")
                    with gr.Row(equal_height=True):
                        textbox = gr.Textbox(
                            placeholder="Type a message and press Enter…", show_label=False, scale=6,
                            lines=1, max_lines=6, autofocus=True, elem_id="message", container=False,
                            max_length=MAX_TYPED_CHARS,
                        )
                        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                        clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
                    gr.Examples(EXAMPLES, inputs=[textbox], label="Examples")
                    use_retrieval = gr.Checkbox(
                        value=True, label="Use retrieval (similar past dialogues)", elem_id="use-retrieval",
                        info="Off: the model answers without looking at Empathetic Dialogues conversations.",
                    )
                    with gr.Accordion("Generation settings", open=False):
                        preset_box = gr.Dropdown(list(PRESETS), value=preset, label="Preset", elem_id="preset",
                                                 info="Choosing a preset sets the sliders below.")
                        preset_info = gr.Markdown(f"*{PRESET_DESCRIPTIONS.get(preset, '')}*", elem_id="preset-info")
                        sliders = {}
                        for row in SLIDER_ROWS:
                            with gr.Row():
                                for name, (low, high, step, label) in row.items():
                                    sliders[name] = gr.Slider(
                                        low, high, value=getattr(default, name), step=step, label=label,
                                        elem_id=name.replace("_", "-"),
                                        interactive=default.do_sample or name not in SAMPLING_ONLY,
                                        info="more than 1: beam search (replies appear at once)"
                                        if name == "num_beams" else None)
                with gr.Column(scale=2, min_width=300):
                    emotion = gr.Label(label="Detected emotion (latest message)" if bot.emotion is not None
                                       else "Detected emotion (off: no emotion classifier loaded)", elem_id="emotion")
                    notes = gr.Markdown(elem_classes="ed-notes", elem_id="notes")
                    why = gr.HTML(render.why_html(None), elem_id="why", js_on_load=None)
                    retrieved = gr.HTML(render.retrieved_html(None, True, bot, index_build), elem_id="retrieved",
                                        js_on_load=None)
            history = gr.State([])

        with gr.Tab("Compare", id="compare"):
            gr.Markdown("One message, two replies side by side, from the same generation settings and seed "
                        "(set them under *Generation settings* on the Chat tab).")
            with gr.Row(equal_height=True):
                compare_box = gr.Textbox(placeholder="A message to compare replies on…", show_label=False,
                                         scale=6, lines=1, max_lines=6, elem_id="compare-message",
                                         container=False, max_length=MAX_TYPED_CHARS)
                compare_button = gr.Button("Compare", variant="primary", scale=1, min_width=100,
                                           elem_id="compare-button")
                compare_stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
            gr.Examples(EXAMPLES[:3], inputs=[compare_box], label="Examples")
            sides = {}
            with gr.Row():
                for side, system in (("Left", DEFAULT_LEFT), ("Right", DEFAULT_RIGHT)):
                    with gr.Column():
                        chooser = gr.Dropdown(list(SYSTEMS), value=system, label=f"{side} system",
                                              elem_id=f"{side.lower()}-system")
                        sides[side] = chooser, gr.Textbox(
                            label=f"{side}: {render.system_label(system)}", lines=6, max_lines=14, interactive=False,
                            buttons=["copy"], elem_id=f"{side.lower()}-reply",
                            placeholder=f"The {side.lower()} system's reply appears here.")
            (left, left_reply), (right, right_reply) = sides["Left"], sides["Right"]
            compare_notes = gr.Markdown(elem_classes="ed-notes", elem_id="compare-notes")
            compare_retrieved = gr.HTML(compare_panel(None), elem_id="compare-retrieved", js_on_load=None)
            with gr.Accordion("Comparisons made this session", open=True):
                table = gr.Dataframe(headers=render.COMPARE_HEADERS, value=[], datatype="str", interactive=False, wrap=True,
                                     elem_id="comparisons", column_widths=["22%", "9%", "30%", "9%", "30%"])
                download = gr.DownloadButton("Download CSV", visible=False, size="sm", elem_id="download-csv")
            comparisons = gr.State({"rows": [], "folder": None})

        with gr.Tab("Results & About", id="about"):
            about_tab(bot)

        # ------------------------------------------------------------------ handlers (dicts: component -> value)
        def run_chat(message: str, history_value: list[dict], retrieval: bool, preset: str,
                     **slider_values: float) -> Iterator[dict]:
            settings = chosen_settings(preset, slider_values)
            past = list(history_value or [])
            text, _ = normalise_message(message or "")
            if not text:  # the facade answers an empty message without a model call
                yield {notes: render.notes_markdown(bot.respond(message or "", past, retrieval, settings))}
                return
            shown = [*(render.display_message(m["role"], m["content"], m.get("title")) for m in past),
                     render.display_message("user", text)]
            yield {textbox: "", chat: shown, history: past, notes: "", banner: render.crisis_banner(None),
                   why: render.why_html(None)}
            with closing(bot.stream(message, past, use_retrieval=retrieval, settings=settings)) as replies:
                for n, reply in enumerate(replies):
                    title = render.reply_title(reply)
                    turn = [{"role": "user", "content": text},
                            {"role": "assistant", "content": reply.text, "title": title}]
                    update = {chat: [*shown, render.display_message("assistant", reply.text, title)],
                              history: past + turn}
                    if n == 0 or reply.done:
                        update |= {emotion: render.emotion_value(reply), notes: render.notes_markdown(reply),
                                   retrieved: render.retrieved_html(reply, retrieval, bot, index_build),
                                   banner: render.crisis_banner(reply), why: render.why_html(reply)}
                    yield update

        def clear_chat() -> dict:
            return {chat: [], history: [], emotion: None, retrieved: render.retrieved_html(None, True, bot, index_build),
                    notes: "", banner: render.crisis_banner(None), textbox: "", why: render.why_html(None)}

        def apply_preset(preset: str) -> dict:
            chosen = PRESETS.get(preset, default)
            return {preset_info: f"*{PRESET_DESCRIPTIONS.get(preset, '')}*",
                    **{slider: gr.update(value=getattr(chosen, name),
                                         interactive=chosen.do_sample or name not in SAMPLING_ONLY)
                       for name, slider in sliders.items()}}

        def run_compare(message: str, left_system: str, right_system: str, session: dict, preset: str,
                        **slider_values: float) -> Iterator[dict]:
            settings = chosen_settings(preset, slider_values)
            left_system, right_system = check_system(left_system, "left"), check_system(right_system, "right")
            text, _ = normalise_message(message or "")
            if not text:
                empty = bot.respond(message or "", settings=settings, system=left_system)
                yield {compare_notes: render.notes_markdown(empty)}
                return
            yield {left_reply: "", right_reply: "", compare_notes: "", compare_retrieved: compare_panel(None)}
            pair: tuple[Reply, Reply] | None = None
            with closing(bot.compare_stream(message, left_system, right_system, settings=settings)) as pairs:
                for pair in pairs:
                    yield {left_reply: pair[0].text, right_reply: pair[1].text}
            if pair is None:
                return
            rows = session["rows"] + [[text, left_system, pair[0].text, right_system, pair[1].text]]
            folder = session.get("folder") or tempfile.mkdtemp(prefix="empathetic-chat-")
            rag = next((pair[i] for i, s in ((1, right_system), (0, left_system)) if SYSTEMS[s].retrieval), None)
            yield {left_reply: pair[0].text, right_reply: pair[1].text, compare_notes: render.notes_markdown(*pair),
                   compare_retrieved: compare_panel(rag or pair[0], rag is not None),
                   comparisons: {"rows": rows, "folder": folder}, table: rows,
                   download: gr.update(value=render.write_csv(rows, folder), visible=True)}

        # ------------------------------------------------------------------ events (private: the API is above)
        controls = {"preset": preset_box, **sliders}
        chat_in = {"message": textbox, "history_value": history, "retrieval": use_retrieval, **controls}
        chat_out = [textbox, chat, history, emotion, retrieved, notes, banner, why]
        chatted = [event(run_chat, inputs_kwargs=chat_in, outputs=chat_out, show_progress="minimal", **private)
                   for event in (textbox.submit, send.click)]
        stop.click(None, cancels=chatted, **private)
        for event in (clear.click, chat.clear):  # Clear, and the chat's own trash-can button
            event(clear_chat, None, chat_out, queue=False, **private)
        preset_box.change(apply_preset, preset_box, [preset_info, *sliders.values()], queue=False, **private)

        compare_in = {"message": compare_box, "left_system": left, "right_system": right, "session": comparisons,
                      **controls}
        compare_out = [left_reply, right_reply, compare_retrieved, compare_notes, comparisons, table, download]
        compared = [event(run_compare, inputs_kwargs=compare_in, outputs=compare_out, **private)
                    for event in (compare_button.click, compare_box.submit)]
        compare_stop.click(None, cancels=compared, **private)
        for side, (chooser, reply_box) in sides.items():
            chooser.change(lambda system, side=side: gr.update(label=f"{side}: {render.system_label(system)}"),
                           chooser, reply_box, queue=False, **private)

        def refresh_status() -> dict:
            text = render.status_markdown(bot, index_build)
            return {status: gr.update(value=text, visible=bool(text)),
                    timer: gr.Timer(active=bool(index_build and index_build.running))}

        timer.tick(refresh_status, None, [status, timer], **private)

    # One model serves everyone (the bot serialises generation); requests beyond the queue size are turned away.
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    return demo


def figure(path: Path, label: str, missing: str) -> None:
    """A figure from assets/, or a note naming the command that makes it."""
    if path.exists():
        gr.Markdown(f"### {label}")
        gr.Image(str(path), label=label, interactive=False, show_label=False, buttons=["fullscreen"])
    else:
        gr.Markdown(f"**{label}** is missing: `{path.relative_to(ASSETS_DIR.parent)}` does not exist yet. {missing}",
                    elem_classes="ed-missing")


def about_tab(bot: EmpatheticChatbot) -> None:
    """Figures, evaluation results, models in use, data licence and the disclaimer."""
    gr.Markdown("## Results")
    adapter = bot.chat.adapter_path or DEFAULT_ADAPTER_DIR
    with gr.Row():
        with gr.Column():
            figure(ASSETS_DIR / "figures" / "emotion_distribution.png", "Emotions in the training data",
                   "Run `python data_stats.py` to produce it.")
        with gr.Column():
            figure(adapter / "loss.png", "Training loss of the tuned adapter",
                   "Train the adapter with `python train.py` to produce it.")
    results_md = ASSETS_DIR / "results" / "results.md"
    if results_md.exists():
        gr.Markdown("### Evaluation")
        gr.Markdown(results_md.read_text(encoding="utf-8"))
    else:
        gr.Markdown("**Evaluation table** is missing: `assets/results/results.md` does not exist yet. "
                    "Run `python eval.py` to produce it.", elem_classes="ed-missing")
    charts = sorted((ASSETS_DIR / "results").glob("*.png"))
    with gr.Row():
        for chart in charts:
            with gr.Column():
                gr.Markdown(f"### {chart.stem.replace('_', ' ').capitalize()}")
                gr.Image(str(chart), label=chart.stem, interactive=False, show_label=False, buttons=["fullscreen"])
    methods_md = ASSETS_DIR / "results" / "training" / "results.md"
    if methods_md.exists():  # eval.py --perplexity-only over every shipped adapter
        gr.Markdown("### Fine-tuning methods: base, prompt tuning and LoRA, with and without retrieval")
        gr.Markdown(methods_md.read_text(encoding="utf-8"))

    gr.Markdown("## Models in use")
    info = bot.describe()
    gr.Markdown(render.models_markdown(info))
    if info.get("adapter_metrics"):
        gr.Markdown("### The tuned adapter's training metrics")
        gr.Markdown(render.metrics_markdown(info["adapter_metrics"]))

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
        "If you are struggling or thinking about suicide or self-harm:\n"
        f"{RESOURCES_MARKDOWN}",
        elem_classes="ed-disclaimer",
    )
