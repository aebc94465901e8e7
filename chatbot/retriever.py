"""Retrieval of similar past dialogues: a FAISS index over train-split listener replies, with a manifest."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from chatbot.data import Example, Turn, data_checksum, load_examples
from chatbot.embeddings import EMBEDDER_NAME, EMBEDDER_PRECISION, Embedder, embed, load_embedder
from chatbot.runtime import DEFAULT_SEED, cpu_threads

logger = logging.getLogger(__name__)

# v3: only the dialogues are embedded (v2 also stored the replies' vectors; the response selector now embeds
# replies in its own space and caches them per index, see chatbot.selector).
INDEX_FORMAT_VERSION = "ed-index-v3"
INDEX_TYPES = ("flat", "ivf", "hnsw")
# A reply depends mostly on the last exchange; longer keys dilute the embedding.
QUERY_TURNS = 2
INDEX_FILE, RECORDS_FILE, MANIFEST_FILE = "index.faiss", "records.jsonl", "manifest.json"


class IndexLoadError(RuntimeError):
    """The index is missing, corrupt, or was built differently from what is asked for."""


@dataclass(frozen=True)
class RetrievedDialogue:
    """One retrieved past dialogue: what was said, the listener's reply and how similar it is."""

    score: float
    emotion: str
    situation: str
    context: str
    response: str
    conv_id: str
    row: int = -1  # position in the index (its reply's stored vector); -1: not from an index

    def to_dict(self) -> dict:
        """Plain dict, for JSON (without `row`, which only this index's reader can use)."""
        return {key: value for key, value in asdict(self).items() if key != "row"}


def query_text(history: Sequence[Turn]) -> str:
    """The text a dialogue is keyed by: its last few turns."""
    return "\n".join(turn.text for turn in history[-QUERY_TURNS:])


def _records(examples: Iterable[Example]) -> list[dict]:
    return [
        {
            "context": query_text(ex.history),
            "response": ex.reply,
            "situation": ex.situation,
            "emotion": ex.emotion,
            "conv_id": ex.conv_id,
        }
        for ex in examples
    ]


def faiss_index(vectors: np.ndarray, index_type: str) -> faiss.Index:
    dim = vectors.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        # faiss wants ~39 training points per list; small corpora get fewer lists.
        nlist = max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nlist, 16)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
    else:
        raise ValueError(f"Unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    index.add(vectors)
    return index


def recall_at_k(approximate: faiss.Index, vectors: np.ndarray, k: int = 10, queries: int = 500) -> float:
    """Share of exact top-k neighbours that an approximate index also returns."""
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(sample, k)
    _, found = approximate.search(sample, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found))
    return hits / truth.size


def build_index(
    examples: Sequence[Example],
    embedder: Embedder,
    out_dir: Path,
    data_checksum: str,
    index_type: str = "flat",
    embedder_name: str = EMBEDDER_NAME,
    batch_size: int = 128,
) -> dict:
    """Embed the examples' contexts, write index, records and manifest atomically."""
    if not examples:
        raise IndexLoadError("No examples to index")
    out_dir = Path(out_dir)
    recover_interrupted_build(out_dir)
    started = time.perf_counter()
    records = _records(examples)
    vectors = embed(embedder, [r["context"] for r in records], batch_size=batch_size, progress=True)
    index = faiss_index(vectors, index_type)
    seconds = time.perf_counter() - started
    manifest = {
        "format_version": INDEX_FORMAT_VERSION,
        "embedder": embedder_name,
        "embedder_precision": EMBEDDER_PRECISION,
        "dim": int(vectors.shape[1]),
        "count": len(records),
        "index_type": index_type,
        "data_checksum": data_checksum,
        "query_turns": QUERY_TURNS,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 1),
        "texts_per_second": round(len(records) / seconds, 1),
    }
    if index_type != "flat":
        manifest["recall_at_10_vs_flat"] = round(recall_at_k(index, vectors), 4)
        logger.info("%s recall@10 against flat: %.4f", index_type, manifest["recall_at_10_vs_flat"])
    # Write a complete sibling folder first, then swap it in: a crash never leaves a half-written index.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        with open(tmp / RECORDS_FILE, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    except BaseException:  # disk full, Ctrl-C...: the previous index stays as it was, with no debris beside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("Indexed %d dialogues in %.1fs (%s) -> %s", len(records), seconds, index_type, out_dir)
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_interrupted_build(out_dir: Path) -> None:
    """Clear what a killed build left beside `out_dir`; put the previous index back if it died mid-swap."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    for debris in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*")):
        kind, _, pid = debris.name[len(out_dir.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue  # not ours, or a build still running
        if kind == "old" and not out_dir.exists():
            logger.warning("Restoring the index a killed build had moved aside: %s -> %s", debris, out_dir)
            os.replace(debris, out_dir)
        else:
            logger.info("Removing what a killed build left behind: %s", debris)
            shutil.rmtree(debris, ignore_errors=True)


def build_from_data(
    data_dir: str | os.PathLike | None,
    index_dir: Path,
    embedder: Embedder | None = None,
    split: str = "train",
    index_type: str = "flat",
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    batch_size: int = 128,
) -> dict:
    """Load a split's listener replies (downloading the data if needed) and build the index from them.

    Without an `embedder` the default one is loaded, after the data has been read (bad data fails fast).
    """
    examples = load_examples(data_dir, split, limit=limit, seed=seed)
    checksum = data_checksum(data_dir, [split])
    embedder = embedder if embedder is not None else load_embedder()
    return build_index(examples, embedder, index_dir, checksum, index_type, EMBEDDER_NAME, batch_size)


def read_manifest(index_dir: Path) -> dict:
    """The manifest of an index folder, with a clear error when it is missing or unreadable."""
    path = Path(index_dir) / MANIFEST_FILE
    if not path.exists():
        raise IndexLoadError(f"No index at {index_dir} (missing {MANIFEST_FILE}); run: python build_index.py")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IndexLoadError(f"Corrupt index manifest {path}: {err}; rebuild with: python build_index.py") from err


class Retriever:
    """Top-k similar dialogues for a conversation, from an index built by build_index.py."""

    def __init__(self, index_dir: Path, embedder: Embedder, embedder_name: str = EMBEDDER_NAME):
        """Load and check an index; raises IndexLoadError with a clear message when it does not fit."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        problems = []
        if manifest.get("format_version") != INDEX_FORMAT_VERSION:
            problems.append(f"format {manifest.get('format_version')!r} != {INDEX_FORMAT_VERSION!r}")
        if manifest.get("embedder") != embedder_name:
            problems.append(f"embedder {manifest.get('embedder')!r} != {embedder_name!r}")
        dim = embedder.get_embedding_dimension()
        if manifest.get("dim") != dim:
            problems.append(f"dimension {manifest.get('dim')} != {dim}")
        if problems:
            raise IndexLoadError(f"Index {index_dir} does not fit: {'; '.join(problems)}. Rebuild: python build_index.py")
        try:
            self.index = faiss.read_index(str(index_dir / INDEX_FILE))
            with open(index_dir / RECORDS_FILE, encoding="utf-8") as fh:
                self.records = [json.loads(line) for line in fh]
        except (RuntimeError, OSError, ValueError) as err:
            raise IndexLoadError(f"Corrupt index at {index_dir}: {err}. Rebuild: python build_index.py") from err
        if self.index.ntotal != len(self.records) or len(self.records) != manifest.get("count"):
            raise IndexLoadError(
                f"Corrupt index at {index_dir}: {self.index.ntotal} vectors, {len(self.records)} records, "
                f"manifest says {manifest.get('count')}. "
                "Rebuild: python build_index.py"
            )
        self.manifest = manifest
        self.embedder = embedder
        self.index_dir = index_dir

    def __len__(self) -> int:
        return len(self.records)

    def stored_vectors(self, examples: Sequence[Example]) -> list[np.ndarray | None]:
        """The index's own vector for each example it contains (matched by conversation, context and reply)."""
        found = []
        for ex in examples:
            position = self._positions.get((ex.conv_id, query_text(ex.history), ex.reply))
            found.append(self.index.reconstruct(position) if position is not None and self._reconstructable else None)
        return found

    @functools.cached_property
    def _positions(self) -> dict[tuple[str, str, str], int]:
        # Built on first use: only training and scoring look entries up; the app never pays for it.
        return {(r["conv_id"], r["context"], r["response"]): i for i, r in enumerate(self.records)}

    @property
    def _reconstructable(self) -> bool:
        # IVF indexes need a direct map to give vectors back; flat and HNSW store them as they are.
        return self.manifest.get("index_type", "flat") in ("flat", "hnsw")

    def search_vectors(
        self, vectors: np.ndarray, k: int = 5, exclude_conv_ids: Sequence[Iterable[str]] | None = None
    ) -> list[list[RetrievedDialogue]]:
        """Top-k for each query vector, skipping the conversations in `exclude_conv_ids[i]`."""
        excludes = [set(e) for e in exclude_conv_ids] if exclude_conv_ids else [set()] * len(vectors)
        # Excluded conversations have at most a handful of entries; over-fetch so k usually remain.
        fetch = min(len(self.records), k + 8 * max((len(e) for e in excludes), default=0))
        # One query (a chat message): starting OpenMP's threads costs more than they save, and concurrent
        # requests use the other cores anyway; batches (evaluation, training) keep every core. The setting is
        # OpenMP's, shared with PyTorch in this thread: put back, or every later PyTorch call runs on one core.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if len(vectors) == 1 else cpu_threads())
        try:
            scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), fetch)
        finally:
            faiss.omp_set_num_threads(threads)
        results = []
        for row_scores, row_ids, exclude in zip(scores, ids, excludes):
            hits = []
            for score, idx in zip(row_scores, row_ids):
                if idx < 0:
                    continue
                record = self.records[idx]
                if record["conv_id"] in exclude:
                    continue
                hits.append(RetrievedDialogue(score=float(score), **record, row=int(idx)))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def search(self, history: Sequence[Turn], k: int = 5, exclude_conv_ids: Iterable[str] = ()) -> list[RetrievedDialogue]:
        """Top-k dialogues similar to the end of `history`."""
        vector = embed(self.embedder, [query_text(history)])
        return self.search_vectors(vector, k, [list(exclude_conv_ids)])[0]
