"""The embedder on ONNX Runtime: the same vectors as sentence-transformers, a cached export, a fallback that works."""

from __future__ import annotations

import numpy as np
import torch

from chatbot import embeddings
from chatbot.embeddings import embed, embedder_engine, load_embedder, resolve_embedder, sentence_transformer

TEXTS = [
    "I got a new puppy today!",
    "My grandmother passed away last week and I miss her terribly.",
    "ok",
    "Estoy muy triste hoy.",
    " ".join(["A very long message that goes on and on about work."] * 30),  # past the 128-token cut
]


def test_onnx_vectors_equal_sentence_transformers(embedder):
    """Batched, padded, truncated and single texts: ONNX Runtime gives sentence-transformers' unit vectors."""
    assert embedder_engine(embedder) == "onnxruntime"
    reference = sentence_transformer(resolve_embedder()).encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    for batch_size in (64, 2):
        np.testing.assert_allclose(embed(embedder, TEXTS, batch_size=batch_size), reference, atol=1e-5)
    np.testing.assert_allclose(embed(embedder, TEXTS[:1]), reference[:1], atol=1e-5)
    assert embed(embedder, []).shape == (0, reference.shape[1])


def test_export_is_cached_and_reused_without_sentence_transformers(tmp_path, monkeypatch):
    """The second load reads the cached export: no export again, and no sentence-transformers model is built."""
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    first = load_embedder(device="cpu")
    assert embedder_engine(first) == "onnxruntime"
    assert len(list((tmp_path / "onnx").glob("embedder-*/model.onnx"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("exported again or sentence-transformers loaded")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    monkeypatch.setattr(embeddings, "sentence_transformer", refuse)
    second = load_embedder(device="cpu")
    assert embedder_engine(second) == "onnxruntime"
    np.testing.assert_array_equal(embed(second, TEXTS), embed(first, TEXTS))


def test_corrupt_cached_export_is_rebuilt(tmp_path, monkeypatch):
    """A cached export that no longer opens is exported again and serves the same vectors."""
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    expected = embed(load_embedder(device="cpu"), TEXTS[:2])
    (path,) = (tmp_path / "onnx").glob("embedder-*/model.onnx")
    path.write_bytes(b"not a graph")
    rebuilt = load_embedder(device="cpu")
    assert embedder_engine(rebuilt) == "onnxruntime"
    np.testing.assert_allclose(embed(rebuilt, TEXTS[:2]), expected, atol=1e-6)


def test_failed_export_falls_back_and_leaves_nothing_behind(tmp_path, monkeypatch, caplog):
    """A failing exporter: the embedder stays on sentence-transformers (with a warning) and no half export is kept."""
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model = load_embedder(device="cpu")
    assert embedder_engine(model) == "sentence-transformers"
    assert "exporter crashed" in caplog.text
    assert not list((tmp_path / "onnx").iterdir())
    assert embed(model, TEXTS[:2]).shape == (2, 384)


def test_mismatching_vectors_are_refused(tmp_path, monkeypatch):
    """An export whose vectors differ from sentence-transformers' is neither used nor cached."""
    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path))
    real_call = embeddings.OnnxEncoder.__call__
    monkeypatch.setattr(embeddings.OnnxEncoder, "__call__", lambda self, *a, **k: real_call(self, *a, **k) + 0.01)
    assert embedder_engine(load_embedder(device="cpu")) == "sentence-transformers"
    assert not list((tmp_path / "onnx").iterdir())


def test_engine_switch_keeps_sentence_transformers(monkeypatch):
    """$ED_ENGINE=transformers keeps the embedder (like the chat model) off ONNX Runtime."""
    monkeypatch.setenv("ED_ENGINE", "transformers")
    assert embedder_engine(load_embedder(device="cpu")) == "sentence-transformers"


def test_model_checksums_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    from chatbot.runtime import files_sha256, model_checksum

    monkeypatch.setenv("ED_CACHE_DIR", str(tmp_path / "cache"))
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(b"weights v1")
    config.write_text("{}")
    assert model_checksum([weights, config]) == files_sha256([weights, config])
    calls = []
    monkeypatch.setattr("chatbot.runtime.files_sha256", lambda paths: calls.append(paths) or "hashed again")
    assert model_checksum([weights, config]) == files_sha256([weights, config])  # remembered: not hashed
    assert calls == []
    weights.write_bytes(b"weights version 2")  # another size (and mtime): hashed again
    assert model_checksum([weights, config]) == "hashed again" and len(calls) == 1
