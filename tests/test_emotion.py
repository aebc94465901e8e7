"""Emotion detector: training on synthetic data, save/load round trip, embedder check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatbot.data import load_conversations
from chatbot.embeddings import embed
from chatbot.emotion import EmotionDetector, LexicalFeatures, train_detector


@pytest.fixture(scope="module")
def detector(synthetic_data, embedder):
    conversations = load_conversations(synthetic_data, "train")
    texts = [c.turns[0].text for c in conversations] + [c.situation for c in conversations]
    labels = [c.emotion for c in conversations] * 2
    return train_detector(embedder, embed(embedder, texts), labels, texts, labels)


def test_predicts_training_emotions(detector):
    assert detector.predict("I heard scary noises in the attic last night").label == "afraid"
    prediction = detector.predict("My daughter won the spelling bee!")
    assert prediction.label == "proud" and 0 < prediction.score <= 1


def test_probabilities_are_a_mix_of_both_classifiers(detector, embedder):
    texts = ["We adopted a puppy"]
    vectors = embed(embedder, texts)
    mixed = detector.probabilities(texts, vectors)
    assert np.isclose(mixed.sum(), 1.0, atol=1e-5)
    detector.weight = 1.0
    semantic = detector.probabilities(texts, vectors)
    detector.weight = 0.5
    assert not np.allclose(mixed, semantic)


def test_lexical_features_are_l2_normalised_tfidf():
    features = LexicalFeatures.fit(["proud of my son", "scared of the dark", "proud proud proud"])
    rows = features.transform(["proud of my son", "nothing known here"])
    assert np.isclose(np.sqrt(rows[0].multiply(rows[0]).sum()), 1.0)
    assert rows[1].nnz == 0 or np.isclose(np.sqrt(rows[1].multiply(rows[1]).sum()), 1.0)


def test_save_load_round_trip_and_embedder_check(detector, embedder, tmp_path):
    detector.save(tmp_path / "emo", {"note": "synthetic"})
    loaded = EmotionDetector.load(tmp_path / "emo", embedder)
    texts = ["My goldfish died this morning", "My neighbor blocked my driveway"]
    assert [p.label for p in loaded.predict_many(texts)] == [p.label for p in detector.predict_many(texts)]
    manifest = json.loads((tmp_path / "emo" / "manifest.json").read_text())
    assert manifest["note"] == "synthetic" and len(manifest["labels"]) == 6
    with pytest.raises(ValueError, match="trained on"):
        EmotionDetector.load(tmp_path / "emo", embedder, embedder_name="other/model")
    with pytest.raises(ValueError, match="Cannot read"):
        EmotionDetector.load(tmp_path / "missing", embedder)


def test_emotion_is_read_from_the_users_own_turns_only(detector):
    from chatbot.data import LISTENER, SPEAKER, Turn
    from chatbot.emotion import speaker_text

    turns = [Turn(SPEAKER, "My goldfish died this morning"), Turn(LISTENER, "How exciting! What kind of puppy is it?"),
             Turn(SPEAKER, "He was part of the family")]
    assert speaker_text(turns) == "My goldfish died this morning\nHe was part of the family"
    # A cheerful bot reply in between does not change what the user is detected to feel.
    assert detector.predict_dialogue(turns) == detector.predict_dialogue([turns[0], turns[2]])
    assert detector.predict_dialogue(turns).label == "sad"


def test_train_emotion_script_end_to_end(synthetic_data, synthetic_index, tmp_path, capsys, monkeypatch):
    import train_emotion

    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "emotion"
    assert train_emotion.main(["--data-dir", str(synthetic_data), "--index-dir", str(synthetic_index),
                               "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0 <= manifest["test_accuracy_first_turn"] <= 1 and manifest["test_conversations"] == 2
    assert set(manifest["valid_accuracy_by_weight"]) == {"0.3", "0.4", "0.5", "0.6", "0.7", "1.0"}
    assert manifest["arguments"]["lexical_c"] == 2.0 and "emotion accuracy (test" in capsys.readouterr().out
