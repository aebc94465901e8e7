"""Retrieval: exact-search agreement, exclusion of conversations, manifest checks, atomic rebuilds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatbot.data import SPEAKER, Turn, load_examples
from chatbot.embeddings import embed
from chatbot.retriever import IndexLoadError, Retriever, build_index, faiss_index, query_text


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, synthetic_data, embedder):
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(load_examples(synthetic_data, "train"), embedder, out, data_checksum="abc")
    return out


def test_flat_search_equals_brute_force(small_index, synthetic_data, embedder):
    retriever = Retriever(small_index, embedder)
    examples = load_examples(synthetic_data, "train")
    keys = embed(embedder, [query_text(e.history) for e in examples])
    for text in ["my pet fish died", "a scary sound upstairs", "my kid won a contest"]:
        query = embed(embedder, [text])[0]
        exact = np.argsort(-(keys @ query))[:3]
        hits = retriever.search([Turn(SPEAKER, text)], k=3)
        assert [h.response for h in hits] == [examples[i].reply for i in exact]
        assert np.allclose([h.score for h in hits], (keys @ query)[exact], atol=1e-5)
        assert hits[0].score >= hits[1].score >= hits[2].score


def test_exclusion_never_returns_the_conversation(small_index, embedder):
    retriever = Retriever(small_index, embedder)
    top = retriever.search([Turn(SPEAKER, "my goldfish died")], k=1)[0]
    hits = retriever.search([Turn(SPEAKER, "my goldfish died")], k=5, exclude_conv_ids=[top.conv_id])
    assert hits and all(h.conv_id != top.conv_id for h in hits)


def test_manifest_records_how_it_was_built(small_index):
    manifest = json.loads((small_index / "manifest.json").read_text())
    assert manifest["embedder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["dim"] == 384 and manifest["count"] == 8 and manifest["data_checksum"] == "abc"


def test_loader_refuses_other_embedder_and_corrupt_files(small_index, tmp_path, embedder):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(small_index, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "embedder": "some/other-model"}))
    with pytest.raises(IndexLoadError, match="embedder"):
        Retriever(other, embedder)
    (other / "manifest.json").write_text(json.dumps({**manifest, "format_version": "ed-index-v2"}))
    with pytest.raises(IndexLoadError, match="format 'ed-index-v2'"):
        Retriever(other, embedder)  # an index of the previous format is rebuilt, not misread
    (other / "manifest.json").write_text(json.dumps({**manifest, "count": manifest["count"] + 1}))
    with pytest.raises(IndexLoadError, match="Corrupt"):
        Retriever(other, embedder)
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match="Corrupt"):
        Retriever(other, embedder)
    with pytest.raises(IndexLoadError, match="build_index.py"):
        Retriever(tmp_path / "missing", embedder)


def clustered_unit_vectors(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """Unit vectors scattered around the centres, like sentence embeddings of dialogues on a few dozen topics."""
    points = centres[rng.integers(0, len(centres), count)] + 2.5 * rng.normal(size=(count, centres.shape[1]))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours_of_new_queries(index_type):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 384))
    vectors, queries = clustered_unit_vectors(rng, centres, 3000), clustered_unit_vectors(rng, centres, 200)
    index = faiss_index(vectors, index_type)
    assert index_type != "ivf" or index.nlist > 1
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    _, found = index.search(queries, 10)
    recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found)])
    assert recall >= 0.95, recall


def test_approximate_index_builds_loads_and_reports_its_recall(tmp_path, synthetic_data, embedder):
    manifest = build_index(load_examples(synthetic_data, "train"), embedder, tmp_path / "idx", "abc", "hnsw")
    assert 0 <= manifest["recall_at_10_vs_flat"] <= 1
    assert len(Retriever(tmp_path / "idx", embedder).search([Turn(SPEAKER, "puppy")], k=2)) == 2


def test_rebuild_replaces_index_whole(tmp_path, synthetic_data, embedder):
    examples = load_examples(synthetic_data, "train")
    build_index(examples, embedder, tmp_path / "idx", "first")
    build_index(examples[:3], embedder, tmp_path / "idx", "second")
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["count"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_if_missing_keeps_a_current_index_and_rebuilds_an_older_format(small_index, synthetic_data, tmp_path):
    import shutil

    import build_index

    index = tmp_path / "index"
    shutil.copytree(small_index, index)
    args = ["--data-dir", str(synthetic_data), "--index-dir", str(index), "--if-missing"]
    assert build_index.main(args) == 0
    assert json.loads((index / "manifest.json").read_text())["data_checksum"] == "abc"  # left as it was
    manifest = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps({**manifest, "format_version": "ed-index-v1"}))
    assert build_index.main(args) == 0
    rebuilt = json.loads((index / "manifest.json").read_text())
    assert rebuilt["format_version"] != "ed-index-v1" and rebuilt["data_checksum"] != "abc"


def test_a_single_query_search_leaves_pytorchs_threads_as_they_were(small_index, embedder):
    """FAISS's OpenMP thread count is PyTorch's too: a chat message's one-thread search must not leave it at 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Retriever(small_index, embedder).search([Turn(SPEAKER, "my pet fish died")], k=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
