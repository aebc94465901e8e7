"""Data loading on the synthetic fixture, bad inputs, and the exact counts of the real release."""

from __future__ import annotations

import pytest

from chatbot.data import (
    LISTENER,
    SPEAKER,
    DataError,
    dataset_stats,
    load_conversations,
    load_examples,
    plot_emotion_distribution,
    sample,
)


def test_synthetic_conversations_are_grouped_and_unescaped(synthetic_data):
    conversations = load_conversations(synthetic_data, "train")
    assert len(conversations) == 6
    first = conversations[0]
    assert first.emotion == "sad"
    assert first.turns[0].text == "My goldfish died this morning, I had him for six years."
    assert [t.role for t in first.turns] == [SPEAKER, LISTENER, SPEAKER, LISTENER]


def test_examples_are_history_to_listener_reply(synthetic_data):
    examples = load_examples(synthetic_data, "train")
    # 2 listener turns in each 4-turn conversation, 1 in each 2-turn one.
    assert len(examples) == 2 + 1 + 2 + 1 + 1 + 1
    ex = examples[1]
    assert [t.role for t in ex.history] == [SPEAKER, LISTENER, SPEAKER]
    assert ex.reply == "I understand. Losing a pet really hurts."
    assert ex.history[-1].role == SPEAKER


def test_limit_is_a_seeded_subset():
    items = list(range(100))
    assert sample(items, 10, seed=1) == sample(items, 10, seed=1)
    assert sample(items, 10, seed=1) != sample(items, 10, seed=2)
    assert sample(items, 0) == items


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("conv_id,utterance_idx,context,prompt\nx,1,sad,y\n", "missing column(s) utterance"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    (tmp_path / "train.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_conversations(tmp_path, "train")


def test_wrong_path_names_the_flag(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_conversations(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="--data-dir"):
        load_conversations(tmp_path, "train")


def test_invalid_utf8_and_bad_rows_are_skipped_not_fatal(tmp_path):
    raw = (
        b"conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"
        b"c1,1,sad,lost \xff keys,1,I lost my keys \xfe today,,\n"
        b"c1,2,sad,lost keys,0,Oh no,,\n"
        b"c1,x,sad,broken row\n"
    )
    (tmp_path / "train.csv").write_bytes(raw)
    conversations = load_conversations(tmp_path, "train")
    assert len(conversations[0].turns) == 2
    assert "\ufffd" in conversations[0].turns[0].text


def test_stats_and_figure(synthetic_data, tmp_path):
    stats = dataset_stats(synthetic_data)
    assert stats["splits"]["train"]["conversations"] == 6
    path = plot_emotion_distribution(stats, tmp_path / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_real_release_counts(real_data):
    stats = dataset_stats(real_data)["splits"]
    assert (stats["train"]["conversations"], stats["train"]["utterances"]) == (19532, 84165)
    assert (stats["valid"]["conversations"], stats["valid"]["utterances"]) == (2770, 12078)
    assert (stats["test"]["conversations"], stats["test"]["utterances"]) == (2547, 10973)
    assert all(s["emotions"] == 32 for s in stats.values())


@pytest.mark.integration
def test_official_splits_do_not_share_conversations(real_data):
    ids = {split: {c.conv_id for c in load_conversations(real_data, split)} for split in ("train", "valid", "test")}
    assert not ids["train"] & ids["test"]
    assert not ids["train"] & ids["valid"]


def test_release_archive_is_read_like_the_folder(synthetic_data, tmp_path):
    import tarfile

    archive = tmp_path / "empatheticdialogues.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "valid", "test"):
            tar.add(synthetic_data / f"{split}.csv", arcname=f"empatheticdialogues/{split}.csv")
    from_archive = load_conversations(archive, "train")
    assert from_archive == load_conversations(synthetic_data, "train")
    folder = tmp_path / "only-archive"
    folder.mkdir()
    archive.rename(folder / archive.name)
    assert load_conversations(folder, "test") == load_conversations(synthetic_data, "test")
