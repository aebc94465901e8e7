"""Empathetic Dialogues: locate, read and turn the official release into conversations and examples."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chatbot.runtime import DEFAULT_SEED, PROJECT_ROOT, data_dir_from_env

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
RELEASE_URL = "https://dl.fbaipublicfiles.com/parlai/empatheticdialogues/empatheticdialogues.tar.gz"
DEFAULT_DATA_DIR = PROJECT_ROOT / "data" / "empatheticdialogues"
REQUIRED_COLUMNS = ("conv_id", "utterance_idx", "context", "prompt", "utterance")
SPEAKER, LISTENER = "speaker", "listener"


class DataError(RuntimeError):
    """The data set is missing, unreadable or not in the Empathetic Dialogues layout."""


@dataclass(frozen=True)
class Turn:
    """One utterance; `role` is SPEAKER (who lived the situation) or LISTENER."""

    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    """One Empathetic Dialogues conversation with its emotion label and situation."""

    conv_id: str
    emotion: str
    situation: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Example:
    """Dialogue history -> the listener's next reply."""

    conv_id: str
    emotion: str
    situation: str
    history: tuple[Turn, ...]
    reply: str


def restore_text(text: str) -> str:
    """Undo the release's escaping of commas."""
    return text.replace("_comma_", ",").strip()


def resolve_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the data: the argument, else $ED_DATA_DIR, else data/empatheticdialogues/, else download it."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.exists():
            raise DataError(f"--data-dir {path} does not exist")
        return path
    path = data_dir_from_env()
    if path is not None:
        if not path.exists():
            raise DataError(f"ED_DATA_DIR={path} does not exist")
        return path
    if (DEFAULT_DATA_DIR / "train.csv").exists():
        return DEFAULT_DATA_DIR
    if not download:
        raise DataError(f"No data found: pass --data-dir or set ED_DATA_DIR (looked in {DEFAULT_DATA_DIR})")
    return download_release(DEFAULT_DATA_DIR)


def download_release(target: Path, url: str = RELEASE_URL) -> Path:
    """Download and unpack the official release archive into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    archive = target / "empatheticdialogues.tar.gz"
    logger.info("Downloading Empathetic Dialogues from %s", url)
    try:
        urllib.request.urlretrieve(url, archive)
    except OSError as err:
        raise DataError(
            f"Could not download the data ({err}). Offline? Pass --data-dir PATH (or set ED_DATA_DIR) "
            "to a folder with train.csv, valid.csv and test.csv or the release .tar.gz."
        ) from err
    with tarfile.open(archive) as tar:
        for split in SPLITS:
            member = tar.getmember(f"empatheticdialogues/{split}.csv")
            (target / f"{split}.csv").write_bytes(tar.extractfile(member).read())
    return target


def _decode(raw: bytes, name: str) -> str:
    """UTF-8 text; a stray invalid byte must not sink a 16 MB file, so it shows as U+FFFD (with a warning)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        logger.warning("%s is not valid UTF-8 (first bad byte at offset %d): invalid bytes are replaced by U+FFFD",
                       name, err.start)
        return raw.decode("utf-8", errors="replace")


def _split_source(data_dir: Path, split: str) -> tuple[str, str]:
    """Return (text, name) of one split from a folder or a release archive."""
    if data_dir.is_file() and data_dir.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(data_dir) as tar:
                names = [n for n in tar.getnames() if n.endswith(f"/{split}.csv") or n == f"{split}.csv"]
                if not names:
                    raise DataError(f"{data_dir} has no {split}.csv")
                raw = tar.extractfile(names[0]).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{data_dir} is not a readable .tar.gz archive ({err}); download it again") from err
        return _decode(raw, f"{data_dir}:{names[0]}"), f"{data_dir}:{names[0]}"
    path = data_dir / f"{split}.csv"
    if not path.exists():
        archives = sorted(data_dir.glob("*.tar.gz"))
        if archives:
            return _split_source(archives[0], split)
        raise DataError(f"{path} not found: pass --data-dir to a folder with {', '.join(s + '.csv' for s in SPLITS)}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err}") from err
    return _decode(raw, str(path)), str(path)


def _parse_rows(text: str, name: str) -> Iterator[dict[str, str]]:
    """Yield rows of a release CSV; fields never contain commas (they are escaped as _comma_)."""
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{name} is empty")
    header = lines[0].strip().split(",")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{name} is missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) < len(header) or not fields[header.index("utterance_idx")].strip().isdigit():
            logger.warning("%s line %d is malformed (%d fields, expected %d): skipped", name, number, len(fields), len(header))
            continue
        yield dict(zip(header, fields))


def load_conversations(data_dir: str | os.PathLike | None, split: str) -> list[Conversation]:
    """Read one official split and group its utterances into conversations, in file order."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {SPLITS}")
    text, name = _split_source(resolve_data_dir(data_dir), split)
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in _parse_rows(text, name):
        grouped.setdefault(row["conv_id"], []).append(row)
    conversations = []
    for conv_id, rows in grouped.items():
        rows.sort(key=lambda r: int(r["utterance_idx"]))
        # Roles follow turn order (odd = the speaker who lived the situation): speaker_idx may be blank.
        turns = tuple(Turn(SPEAKER if i % 2 == 0 else LISTENER, restore_text(r["utterance"])) for i, r in enumerate(rows))
        conversations.append(
            Conversation(conv_id, rows[0]["context"].strip(), restore_text(rows[0]["prompt"]), turns)
        )
    if not conversations:
        raise DataError(f"{name} has no utterances")
    return conversations


def conversation_examples(conversation: Conversation) -> list[Example]:
    """Every listener turn of a conversation, with the turns before it as history."""
    return [
        Example(conversation.conv_id, conversation.emotion, conversation.situation, conversation.turns[:i], turn.text)
        for i, turn in enumerate(conversation.turns)
        if turn.role == LISTENER and i > 0
    ]


def load_examples(
    data_dir: str | os.PathLike | None, split: str, limit: int | None = None, seed: int = DEFAULT_SEED
) -> list[Example]:
    """All history -> listener-reply examples of a split; `limit` takes a seeded random subset."""
    return sample(examples_of(load_conversations(data_dir, split)), limit, seed)


def examples_of(conversations: Iterable[Conversation]) -> list[Example]:
    """Every history -> listener-reply example of the conversations, in order."""
    return [ex for conv in conversations for ex in conversation_examples(conv)]


def sample(items: list, limit: int | None, seed: int = DEFAULT_SEED) -> list:
    """A seeded random subset of `limit` items in their original order (all items when limit is falsy)."""
    if not limit or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def data_checksum(data_dir: str | os.PathLike | None, splits: Iterable[str] = SPLITS) -> str:
    """SHA-256 over the raw split files, so artifacts can name the exact data they were built from."""
    digest = hashlib.sha256()
    root = resolve_data_dir(data_dir)
    for split in splits:
        text, _ = _split_source(root, split)
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def dataset_stats(data_dir: str | os.PathLike | None) -> dict:
    """Counts per split (conversations, utterances, listener examples) and the emotion distribution."""
    stats: dict = {"splits": {}, "emotions": {}}
    for split in SPLITS:
        conversations = load_conversations(data_dir, split)
        counts = Counter(c.emotion for c in conversations if c.emotion)
        stats["splits"][split] = {
            "conversations": len(conversations),
            "utterances": sum(len(c.turns) for c in conversations),
            "listener_examples": sum(len(conversation_examples(c)) for c in conversations),
            "emotions": len(counts),
        }
        stats["emotions"][split] = dict(sorted(counts.items()))
    return stats


def plot_emotion_distribution(stats: dict, path: Path) -> Path:
    """Save the per-emotion conversation counts of the train split as a bar chart (the report's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(stats["emotions"]["train"].items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar([k for k, _ in counts], [v for _, v in counts], color="#5b8def")
    ax.set_title("Empathetic Dialogues: conversations per emotion (train split)")
    ax.set_ylabel("conversations")
    ax.tick_params(axis="x", rotation=70)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return path
