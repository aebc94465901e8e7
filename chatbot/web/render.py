"""What the page shows, as escaped text: chat bubbles, notes, the retrieved dialogues, the models and their metrics."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import gradio as gr

from chatbot.bot import EmpatheticChatbot, Reply
from chatbot.safety import RESOURCES_MARKDOWN
from chatbot.web.server import IndexBuild

# No emoji anywhere on the page: Debian's Chromium (and many Linux desktops) has no emoji font and draws boxes.
CRISIS_TITLE = "Safety message – crisis resources"
CONCERN_TITLE = "Check-in – crisis resources"
DATASET_TITLE = "A person's reply from a past conversation (Empathetic Dialogues), chosen by the selector"
WHY_TITLE = "Why this reply"
RETRIEVED_TITLE = "Retrieved dialogues (used for the latest reply)"
COMPARE_RETRIEVED_TITLE = "Retrieved dialogues (what the retrieval side saw)"
COMPARE_HEADERS = ["Message", "Left system", "Left reply", "Right system", "Right reply"]
SYSTEM_LABELS = {"base": "Baseline", "base+rag": "Baseline + retrieval", "tuned": "Tuned", "tuned+rag": "RAG",
                 "tuned+rag+select": "RAG + reply selection"}


def system_label(system: str) -> str:
    """How a system is named in the page, e.g. 'RAG (tuned+rag)'."""
    return f"{SYSTEM_LABELS.get(system, system)} ({system})"


def escape_text(text: str) -> str:
    """Text for markdown-rendered places (chat bubbles, notes): tags are shown as typed, never rendered or run."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def markdown_table(headers: list[str], rows: list[tuple]) -> str:
    """A markdown table whose cells are escaped (no HTML, no column breaks)."""

    def cell(value: object) -> str:
        return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")

    return "\n".join([f"| {' | '.join(headers)} |", "|---" * len(headers) + "|",
                      *(f"| {' | '.join(cell(v) for v in row)} |" for row in rows)])


def emotion_value(reply: Reply | None) -> dict[str, float] | None:
    """gr.Label value for the detected emotion of the latest message."""
    if reply is None or reply.emotion is None:
        return None
    return {reply.emotion.label: float(reply.emotion.score)}


def status_markdown(bot: EmpatheticChatbot, build: IndexBuild | None) -> str:
    """Start-up notes shown above the tabs (retrieval off, no adapter, index being built...)."""
    building = build is not None and build.running
    lines = ["**Building the retrieval index…** This happens once, on first start; until it is ready, replies are "
             "generated without retrieved dialogues."] if building else []
    if build is not None and build.error:
        lines.append(f"Building the retrieval index failed: {escape_text(build.error)}")
    lines += [escape_text(note) for note in bot.notes if not (building and note.startswith("Retrieval is off"))]
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


def notes_markdown(*replies: Reply) -> str:
    """Notes about the latest reply or replies (message shortened, reply replaced, errors), each note once."""
    notes = []
    for reply in replies:
        if reply.kind == "empty":
            notes.append(escape_text(reply.text))
        notes += [escape_text(note) for note in reply.notes]
        if reply.kind == "error":
            notes.append("Something went wrong while generating that reply; you can simply try again.")
    return "\n\n".join(f"- {note}" for note in dict.fromkeys(notes))


def crisis_banner(reply: Reply | None) -> dict:
    """The visible safety banner when the latest reply is the crisis message or carries a check-in line."""
    if reply is not None and reply.crisis:
        return gr.update(value=f"### {CRISIS_TITLE}\nThe last message looked like it might be about self-harm or "
                               f"suicide, so the chatbot's model was not used.\n\n{RESOURCES_MARKDOWN}", visible=True)
    if reply is not None and reply.kind == "concern":
        return gr.update(value=f"### {CONCERN_TITLE}\nThe model replied, and a check-in was added because the last "
                               f"message might be about self-harm or suicide.\n\n{RESOURCES_MARKDOWN}", visible=True)
    return gr.update(value="", visible=False)


def reply_title(reply: Reply) -> str | None:
    """The title a reply's bubble carries: a safety message, or a person's reply from the data set."""
    if reply.crisis:
        return CRISIS_TITLE
    if reply.done and reply.from_dataset:
        return DATASET_TITLE
    return None


def display_message(role: str, text: str, title: str | None = None) -> dict:
    """A gr.Chatbot message: text escaped so HTML shows as typed; crisis and data-set replies carry a title."""
    message = {"role": role, "content": escape_text(text)}
    if title:
        message["metadata"] = {"title": title}
    return message


def why_html(reply: Reply | None) -> str:
    """"Why this reply": every candidate a selecting system weighed, its source, score and the winner."""
    head = f'<div class="ed-panel-title">{WHY_TITLE}</div>'
    if reply is None or not reply.candidates:
        return f'{head}<div class="ed-empty">The candidates behind the latest reply show here.</div>'
    rows = []
    for i, candidate in enumerate(reply.candidates):
        source = ("generated" if candidate.source == "generated"
                  else f"from a past conversation ({html.escape(candidate.situation or '')})")
        score = "–" if candidate.score is None else f"{candidate.score:.3f}"
        state = "shown" if i == reply.chosen else html.escape(candidate.rejected or "")
        row_class = ' class="ed-chosen"' if i == reply.chosen else ""
        rows.append(f"<tr{row_class}><td>{html.escape(candidate.text)}</td><td>{source}</td><td>{score}</td>"
                    f"<td>{state}</td></tr>")
    engine = f'<div class="ed-empty">Generated by {html.escape(reply.engine)}; system {html.escape(reply.system)}.'\
             '</div>' if reply.engine else ""
    return (f'{head}{engine}<table class="ed-why"><tr><th>Candidate</th><th>Source</th><th>Score</th><th></th></tr>'
            f'{"".join(rows)}</table>')


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


def models_markdown(info: dict) -> str:
    """The models and index in use (from `bot.describe()`) as a markdown table."""
    index, emotion = info.get("index"), info.get("emotion_classifier")
    rows = [("Base model", info.get("base_model")),
            ("Tuned adapter", info.get("adapter") or "none (the 'tuned' systems use the base model)")]
    if index:
        rows.append(("Retrieval index", f"{index.get('count', '?')} dialogues, built {index.get('built_at', '?')} "
                                        f"with {index.get('embedder', '?')} ({index.get('index_type', '?')})"))
    else:
        rows.append(("Retrieval index", "none loaded (build it with `python build_index.py`)"))
    rows.append(("Dialogues retrieved per reply", info.get("k")))
    rows.append(("Reply engine", info.get("engine")))
    if info.get("selector"):
        rows.append(("Reply selector", info["selector"]))
    if emotion:
        accuracy = emotion.get("test_accuracy_first_turn")
        shown = f"{accuracy:.1%} accuracy on the test split (first speaker turn, 32 labels)" \
            if isinstance(accuracy, (int, float)) else "accuracy not recorded"
        rows.append(("Emotion classifier", f"{emotion.get('embedder', '?')} + linear layer, {shown}"))
    else:
        rows.append(("Emotion classifier", "none (no classifier at assets/emotion/)"))
    return markdown_table(["Part", "In use"], rows)


def metrics_markdown(metrics: dict) -> str:
    """An adapter's recorded metrics as a table (numbers rounded, per-example details left out), then its protocol."""

    def shown(value: object) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

    rows = [(name.replace("_", " ").capitalize(), shown(value)) for name, value in metrics.items()
            if name != "protocol" and not isinstance(value, (dict, list))]
    protocol = f"\n\nProtocol: {escape_text(str(metrics['protocol']))}" if "protocol" in metrics else ""
    return markdown_table(["Adapter metric", "Value"], rows) + protocol
