"""Response selector: a LoRA on MiniLM learns to rank the right reply first; eval.py's P@1,N; save/load; cached vectors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from chatbot.data import examples_of, load_conversations, load_examples, sample
from chatbot.embeddings import adapter_digest, embed
from chatbot.selector import (
    ResponseSelector,
    SelectorLoadError,
    SelectorTuning,
    candidate_sets,
    load_response_selector,
    precision_at_1,
    read_selector,
    tune_selector,
)

# Dialogues whose right reply is an arbitrary code: plain MiniLM cosine cannot know which one fits.
THINGS = ["bicycle", "laptop", "garden", "guitar", "kitchen sink", "car battery", "phone screen", "washing machine"]
CODES = ["Ask Maria.", "Try the blue box.", "Seven is the answer.", "Go north first.", "The red door opens.",
         "Tuesday works best.", "Bring the lantern.", "Count to twelve."]
PAIRS = [(f"My {thing} is broken again.", code) for thing, code in zip(THINGS, CODES)]
TINY = SelectorTuning(rank=4, lr=5e-3, batch_size=8)


def ranking(selector: ResponseSelector) -> float:
    """P@1 of each dialogue's own code among all codes."""
    rows = [[code, *(c for c in CODES if c != code)] for code in CODES]
    return precision_at_1(selector.score_many([context for context, _ in PAIRS], rows))


@pytest.fixture(scope="module")
def tuned(embedder):
    """A selector adapter trained for a few passes over the synthetic pairs."""
    model, weights, log = tune_selector(embedder, PAIRS * 12, TINY, seed=0, progress=False)
    return model, weights, log


def test_training_ranks_the_right_reply_above_unrelated_ones(embedder, tuned):
    model, weights, _ = tuned
    assert ranking(ResponseSelector(embedder)) < 50  # untuned MiniLM cannot see the arbitrary pairing
    assert ranking(ResponseSelector(model)) == 100.0
    assert weights and all("lora_" in name for name in weights)


def test_validation_keeps_the_best_checkpoint(embedder):
    from peft import get_peft_model_state_dict

    scores = iter([50.0, 90.0, 10.0, 10.0])  # the checkpoint after 8 pairs is the best by this (made-up) validation
    seen = []

    def evaluate(model):
        seen.append(adapter_digest({k: v.detach().numpy() for k, v in get_peft_model_state_dict(model[0].auto_model).items()}))
        return next(scores)

    _, weights, log = tune_selector(embedder, PAIRS * 3, TINY, seed=0, evaluate=evaluate, every=8, progress=False)
    assert [entry["pairs"] for entry in log] == [0, 8, 16, 24] and [e["valid"] for e in log] == [50.0, 90.0, 10.0, 10.0]
    assert adapter_digest(weights) == seen[1] != seen[-1]
    # The learning rate falls linearly to 0 over the pass (3 steps of 8 pairs), or stays put without decay.
    assert [e["lr"] for e in log] == pytest.approx([TINY.lr, TINY.lr * 2 / 3, TINY.lr / 3, 0.0])
    scores = iter([50.0, 90.0, 10.0, 10.0])
    _, _, log = tune_selector(embedder, PAIRS * 3, replace(TINY, lr_decay=False), seed=0, evaluate=evaluate, every=8,
                              progress=False)
    assert [e["lr"] for e in log] == pytest.approx([TINY.lr] * 4)


def test_another_pass_starts_from_the_saved_adapter(embedder, tuned, tmp_path):
    model, weights, _ = tuned
    ResponseSelector(embedder).save(tmp_path / "sel", TINY.lora, weights)
    _, initial = read_selector(tmp_path / "sel")
    scores = []
    _, _, log = tune_selector(embedder, PAIRS, replace(TINY, lr=0.0), seed=0, progress=False, initial=initial,
                              evaluate=lambda m: scores.append(ranking(ResponseSelector(m))) or scores[-1])
    assert scores[0] == 100.0  # before any step: the saved adapter's ranking, not a fresh LoRA's
    with pytest.raises(ValueError, match="does not fit"):
        tune_selector(embedder, PAIRS, replace(TINY, rank=8), seed=0, progress=False, initial=initial)


def test_untuned_selector_scores_are_minilm_cosines(embedder):
    selector = ResponseSelector(embedder)
    context, replies = "My dog died today.", ["I am so sorry for your loss.", "Congratulations on the new job!"]
    vectors = embed(embedder, [context, *replies])
    assert np.allclose(selector.score(context, replies), vectors[1:] @ vectors[0], atol=1e-5)
    assert selector.score(context, []) == []


def test_known_vectors_are_used_not_embedded_again(embedder, monkeypatch):
    """A reply whose vector is at hand scores as its fresh embedding would, without an embedding call."""
    import chatbot.selector as selector_module

    selector = ResponseSelector(embedder)
    context, replies = "My dog died today.", ["I am so sorry for your loss.", "Congratulations on the new job!"]
    expected = selector.score(context, replies)
    embedded = []
    monkeypatch.setattr(selector_module, "embed", lambda model, texts: embedded.extend(texts) or embed(model, texts))
    known = {replies[1]: embed(embedder, [replies[1]])[0]}
    assert np.allclose(selector.score(context, replies, known), expected, atol=1e-5)
    assert embedded == [context, replies[0]]


def test_index_vectors_are_the_selectors_embeddings_cached_per_index_and_adapter(embedder, tuned, synthetic_index,
                                                                                 tmp_path, monkeypatch):
    import chatbot.selector as selector_module
    from chatbot.retriever import Retriever

    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    retriever = Retriever(synthetic_index, embedder)
    model, weights, _ = tuned
    selector = ResponseSelector(model, {"encoder_adapter": {"sha256": adapter_digest(weights)}})
    vectors = selector.index_vectors(retriever)
    assert np.allclose(vectors, embed(model, [r["response"] for r in retriever.records]), atol=1e-5)
    hits = retriever.search_vectors(embed(embedder, ["my goldfish died"]), 2)[0]
    known = selector.known_replies(retriever, hits)
    assert list(known) == [h.response for h in hits] and np.allclose(known[hits[0].response], vectors[hits[0].row])
    monkeypatch.setattr(selector_module, "embed", lambda *a, **k: pytest.fail("embedded again"))
    again = ResponseSelector(model, dict(selector.manifest)).index_vectors(retriever)  # a fresh start: the cache
    assert np.array_equal(np.asarray(again), np.asarray(vectors))
    assert len(list((tmp_path / "selector").glob("*.npy"))) == 1
    monkeypatch.undo()
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    ResponseSelector(embedder).index_vectors(retriever)  # another adapter (none): its own vectors
    assert len(list((tmp_path / "selector").glob("*.npy"))) == 2


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


def test_save_load_round_trip_and_manifest_checks(embedder, tuned, tmp_path, caplog):
    model, weights, _ = tuned
    ResponseSelector(embedder).save(tmp_path / "sel", TINY.lora, weights, {"metrics": {"note": "synthetic"}})
    loaded = ResponseSelector.load(tmp_path / "sel", embedder)
    assert ranking(loaded) == 100.0  # the adapter, stored in float16 and merged, still ranks every pair right
    contexts = [context for context, _ in PAIRS]
    assert np.allclose(embed(loaded.encoder, contexts), embed(model, contexts), atol=5e-3)
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["embedder"] == "sentence-transformers/all-MiniLM-L6-v2" and manifest["kind"] == "minilm-lora"
    assert manifest["format_version"] == "ed-selector-v2" and manifest["query_turns"] == 2
    assert manifest["encoder_adapter"]["lora"]["r"] == 4 and manifest["metrics"] == {"note": "synthetic"}
    with pytest.raises(SelectorLoadError, match="embedder 'sentence-transformers/all-MiniLM-L6-v2' != 'other/model'"):
        ResponseSelector.load(tmp_path / "sel", embedder, embedder_name="other/model")
    (tmp_path / "sel" / "manifest.json").write_text(json.dumps({**manifest, "format_version": "ed-selector-v1"}))
    with pytest.raises(SelectorLoadError, match="format_version"):
        ResponseSelector.load(tmp_path / "sel", embedder)
    adapter = {**manifest["encoder_adapter"], "sha256": "0" * 64}
    (tmp_path / "sel" / "manifest.json").write_text(json.dumps({**manifest, "encoder_adapter": adapter}))
    with pytest.raises(SelectorLoadError, match="checksum"):
        ResponseSelector.load(tmp_path / "sel", embedder)
    with pytest.raises(SelectorLoadError, match="Cannot read"):
        ResponseSelector.load(tmp_path / "missing", embedder)
    assert load_response_selector(embedder, tmp_path / "missing") is None
    assert "Response selection off" in caplog.text


def test_train_selector_script_end_to_end(synthetic_data, synthetic_index, tmp_path, capsys, monkeypatch):
    import train_selector as script

    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "selector"
    code = script.main(["--data-dir", str(synthetic_data), "--index-dir", str(synthetic_index), "--out", str(out),
                        "--batch-size", "2", "--eval-every", "2", "--candidates", "3", "--valid-examples", "2",
                        "--test-examples", "3", "--rank", "2", "--cross-encoder-seconds", "0.1",
                        "--cross-encoder-dialogues", "2"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    trained = len(load_examples(synthetic_data, "train"))
    assert manifest["train_dialogues"] == trained
    assert [e["pairs"] for e in manifest["metrics"]["valid_p_at_1_by_checkpoint"]] == [*range(0, trained, 2), trained]
    assert set(manifest["metrics"]["test_3"]) == {"untuned_minilm", "selector"}
    assert set(manifest["metrics"]["test_3"]["selector"]) == {"p_at_1_3", "p_at_1_10", "p_at_1_10_retrieved"}
    trial = manifest["metrics"]["cross_encoder_trial"]
    assert trial["cross_encoder"]["pairs_seen"] > 0 and "ms_per_10_candidates" in trial["selector"]
    assert manifest["tuning"]["rank"] == 2 and manifest["arguments"]["eval_every"] == 2
    assert "train_seconds" in manifest and "test, 3 dialogues" in capsys.readouterr().out
    assert ResponseSelector.load(out, script.load_embedder()).manifest["train_dialogues"] == trained
    again = tmp_path / "again"
    common = ["--data-dir", str(synthetic_data), "--index-dir", str(synthetic_index), "--batch-size", "2",
              "--candidates", "3", "--valid-examples", "2", "--test-examples", "3", "--init", str(out)]
    assert script.main([*common, "--out", str(again), "--rank", "2"]) == 0
    assert json.loads((again / "manifest.json").read_text())["initial_adapter"]["encoder_adapter"] == manifest["encoder_adapter"]
    assert script.main([*common, "--out", str(tmp_path / "other"), "--rank", "4"]) == 2  # another rank: refused
    assert "give the same --rank" in capsys.readouterr().err


@pytest.mark.integration
def test_shipped_selector_beats_untuned_minilm_on_real_test_dialogues(real_data, embedder):
    from chatbot.retriever import query_text
    from chatbot.selector import SELECTOR_DIR

    selector = ResponseSelector.load(SELECTOR_DIR, embedder)
    test = examples_of(load_conversations(real_data, "test"))
    examples = sample(test, 100, 42)
    sets = candidate_sets(examples, sample(test, 1000, 43), 10, 42)
    contexts = [query_text(ex.history) for ex in examples]
    assert precision_at_1(selector.score_many(contexts, sets)) > precision_at_1(ResponseSelector(embedder).score_many(contexts, sets))
