"""Response selector: learns to rank the right reply first, eval.py's P@1,N protocol, save/load with its manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatbot.data import examples_of, load_conversations, load_examples, sample
from chatbot.embeddings import embed
from chatbot.selector import (
    ResponseSelector,
    SelectorLoadError,
    candidate_sets,
    load_response_selector,
    precision_at_1,
    train_selector,
)

DIM, PAIRS, HELD_OUT = 16, 48, 16


class LookupEncoder:
    """A tiny stand-in for a sentence embedder: each text has a fixed vector."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, texts, **_) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])

    def get_embedding_dimension(self) -> int:
        return DIM


@pytest.fixture(scope="module")
def rotated_pairs():
    """Contexts and replies where the right reply is a fixed rotation of its context: unrelated to plain cosine."""
    rng = np.random.default_rng(0)
    contexts = rng.normal(size=(PAIRS + HELD_OUT, DIM))
    contexts /= np.linalg.norm(contexts, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    replies = contexts @ rotation.T
    texts = {f"context {i}": c for i, c in enumerate(contexts)} | {f"reply {i}": r for i, r in enumerate(replies)}
    return LookupEncoder(texts), contexts.astype(np.float32), replies.astype(np.float32)


def held_out_ranking(selector: ResponseSelector) -> float:
    """P@1 of each held-out context's own reply among all held-out replies."""
    ids = range(PAIRS, PAIRS + HELD_OUT)
    rows = [[f"reply {i}", *(f"reply {j}" for j in ids if j != i)] for i in ids]
    return precision_at_1(selector.score_many([f"context {i}" for i in ids], rows))


def test_training_ranks_the_right_reply_above_unrelated_ones(rotated_pairs):
    encoder, contexts, replies = rotated_pairs
    untuned = ResponseSelector(encoder, np.eye(DIM), np.eye(DIM))
    selector, log = train_selector(encoder, contexts[:PAIRS], replies[:PAIRS], epochs=40, batch_size=16,
                                   learning_rate=0.05, progress=False)
    assert held_out_ranking(untuned) < 30  # plain cosine cannot see the rotation
    assert held_out_ranking(selector) == 100.0  # the learned maps generalise to pairs never trained on
    assert log[0]["loss"] is None and log[-1]["loss"] < log[1]["loss"]


def test_validation_keeps_the_best_epoch(rotated_pairs):
    encoder, contexts, replies = rotated_pairs
    scores = iter([50.0, 90.0] + [10.0] * 10)  # epoch 1 is the best by this (made-up) validation
    kept = []

    def evaluate(selector):
        kept.append(selector.context_map.copy())
        return next(scores)

    selector, log = train_selector(encoder, contexts, replies, epochs=4, batch_size=16, learning_rate=0.05,
                                   evaluate=evaluate, progress=False)
    assert [e["valid"] for e in log] == [50.0, 90.0, 10.0, 10.0, 10.0]
    assert np.array_equal(selector.context_map, kept[1]) and not np.array_equal(selector.context_map, kept[-1])


def test_hard_negatives_are_used(rotated_pairs):
    encoder, contexts, replies = rotated_pairs
    # The hard negative of each context is its own right reply: with it, the loss cannot go down.
    _, with_gold_as_negative = train_selector(encoder, contexts, replies, replies, epochs=3, batch_size=16,
                                              learning_rate=0.05, progress=False)
    _, plain = train_selector(encoder, contexts, replies, epochs=3, batch_size=16, learning_rate=0.05, progress=False)
    assert with_gold_as_negative[-1]["loss"] > plain[-1]["loss"] + 0.5


def test_untuned_selector_scores_are_minilm_cosines(embedder):
    selector = ResponseSelector(embedder, np.eye(384), np.eye(384))
    context, replies = "My dog died today.", ["I am so sorry for your loss.", "Congratulations on the new job!"]
    vectors = embed(embedder, [context, *replies])
    assert np.allclose(selector.score(context, replies), vectors[1:] @ vectors[0], atol=1e-5)
    assert selector.score(context, []) == []


def test_known_vectors_are_used_not_embedded_again(embedder, monkeypatch):
    """A retrieved reply's vector from the index scores as its fresh embedding would, without an embedding call."""
    import chatbot.selector as selector_module

    selector = ResponseSelector(embedder, np.eye(384), np.eye(384))
    context, replies = "My dog died today.", ["I am so sorry for your loss.", "Congratulations on the new job!"]
    expected = selector.score(context, replies)
    embedded = []
    monkeypatch.setattr(selector_module, "embed", lambda model, texts: embedded.extend(texts) or embed(model, texts))
    known = {replies[1]: embed(embedder, [replies[1]])[0]}
    assert np.allclose(selector.score(context, replies, known), expected, atol=1e-5)
    assert embedded == [context, replies[0]]


def test_candidate_sets_follow_eval_protocol(synthetic_data):
    examples = examples_of(load_conversations(synthetic_data, "train"))
    sets = candidate_sets(examples, examples, size=4, seed=1)
    assert sets == candidate_sets(examples, examples, size=4, seed=1)  # seeded
    by_reply = {ex.reply: ex.conv_id for ex in examples}
    for ex, row in zip(examples, sets):
        assert row[0] == ex.reply and len(row) == 4
        assert all(by_reply[r] != ex.conv_id for r in row[1:])  # distractors never come from its own conversation


def test_precision_at_1_counts_strict_wins_among_the_first_n():
    scores = [np.array([0.9, 0.1, 0.95]), np.array([0.5, 0.5, 0.1]), np.array([0.8, 0.2, 0.3])]
    assert precision_at_1(scores) == pytest.approx(100 / 3)
    assert precision_at_1(scores, candidates=2) == pytest.approx(200 / 3)  # ties are misses


def test_save_load_round_trip_and_manifest_checks(rotated_pairs, tmp_path, caplog):
    encoder, contexts, replies = rotated_pairs
    selector, _ = train_selector(encoder, contexts, replies, epochs=2, batch_size=16, progress=False)
    selector.save(tmp_path / "sel", {"metrics": {"note": "synthetic"}})
    loaded = ResponseSelector.load(tmp_path / "sel", encoder)
    assert np.allclose(loaded.score("context 0", ["reply 0", "reply 1"]), selector.score("context 0", ["reply 0", "reply 1"]),
                       atol=1e-2)  # float16 storage
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["embedder"] == "sentence-transformers/all-MiniLM-L6-v2" and manifest["dim"] == DIM
    assert manifest["format_version"] == "ed-selector-v1" and manifest["query_turns"] == 2
    assert manifest["metrics"] == {"note": "synthetic"}
    with pytest.raises(SelectorLoadError, match="embedder 'sentence-transformers/all-MiniLM-L6-v2' != 'other/model'"):
        ResponseSelector.load(tmp_path / "sel", encoder, embedder_name="other/model")
    (tmp_path / "sel" / "manifest.json").write_text(json.dumps({**manifest, "format_version": "ed-selector-v0"}))
    with pytest.raises(SelectorLoadError, match="format_version"):
        ResponseSelector.load(tmp_path / "sel", encoder)
    with pytest.raises(SelectorLoadError, match="Cannot read"):
        ResponseSelector.load(tmp_path / "missing", encoder)
    assert load_response_selector(encoder, tmp_path / "missing") is None
    assert "Response selection off" in caplog.text


def test_train_selector_script_end_to_end(synthetic_data, synthetic_index, tmp_path, capsys, monkeypatch):
    import train_selector as script

    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "selector"
    code = script.main(["--data-dir", str(synthetic_data), "--index-dir", str(synthetic_index), "--out", str(out),
                        "--epochs", "2", "--batch-size", "4", "--candidates", "3", "--valid-examples", "2",
                        "--test-examples", "3", "--negative-ranks", "1", "3", "--cross-encoder-seconds", "0.1",
                        "--cross-encoder-dialogues", "2"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train_dialogues"] == len(load_examples(synthetic_data, "train"))
    assert [e["epoch"] for e in manifest["metrics"]["valid_p_at_1_by_epoch"]] == [0, 1, 2]
    assert set(manifest["metrics"]["test_3"]) == {"untuned_minilm", "selector"}
    assert set(manifest["metrics"]["test_3"]["selector"]) == {"p_at_1_3", "p_at_1_10", "p_at_1_10_retrieved"}
    trial = manifest["metrics"]["cross_encoder_trial"]
    assert trial["cross_encoder"]["pairs_seen"] > 0 and "ms_per_10_candidates" in trial["selector"]
    assert manifest["arguments"]["epochs"] == 2 and "test, 3 dialogues" in capsys.readouterr().out


@pytest.mark.integration
def test_shipped_selector_beats_untuned_minilm_on_real_test_dialogues(real_data, embedder):
    from chatbot.retriever import query_text
    from chatbot.selector import SELECTOR_DIR

    selector = ResponseSelector.load(SELECTOR_DIR, embedder)
    test = examples_of(load_conversations(real_data, "test"))
    examples = sample(test, 100, 42)
    sets = candidate_sets(examples, sample(test, 1000, 43), 10, 42)
    contexts = [query_text(ex.history) for ex in examples]
    untuned = ResponseSelector(embedder, np.eye(384), np.eye(384))
    assert precision_at_1(selector.score_many(contexts, sets)) > precision_at_1(untuned.score_many(contexts, sets))
