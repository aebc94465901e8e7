"""The one place that picks the device, seeds runs, locates project folders and reads `ED_*` environment variables.

ED_DATA_DIR (the Empathetic Dialogues folder), ED_INDEX_DIR (the retrieval index), ED_CACHE_DIR (converted models),
ED_DEVICE (cpu, cuda, ...) and ED_AUTH (the app's login, user:password).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"
DEFAULT_SEED = 42
M_ARENA_MAX = -8  # glibc mallopt parameter
SERVER_MALLOC_ARENAS = 2


def get_device(preferred: str | None = None) -> torch.device:
    """Return the device to run on: `preferred`, else $ED_DEVICE, else CUDA when present, else CPU."""
    name = preferred or os.environ.get("ED_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_seed(seed: int = DEFAULT_SEED) -> None:
    """Seed Python, NumPy and torch so runs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cpu_threads() -> int:
    """Threads for ONNX Runtime sessions: every core this process may run on.

    ONNX Runtime's own default counts physical cores, which is one on a 2-vCPU machine.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def engine_choice() -> tuple[str, str]:
    """(engine, precision) for served replies: $ED_ENGINE (onnx | transformers), $ED_ONNX_PRECISION (fp32 | int8 | int4,
    the last two optionally with builder options, e.g. int4-acc1-b128: chatbot.engine.parse_precision).

    fp32 is the default: int8 and int4 change greedy text and held-out perplexity (README, Performance).
    """
    return os.environ.get("ED_ENGINE", "onnx"), os.environ.get("ED_ONNX_PRECISION", "fp32")


def files_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 over the files' bytes, in order: what a derived artifact was built from."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_checksum(paths: Sequence[Path]) -> str:
    """`files_sha256` of model files, remembered in the cache folder by each file's path, size and mtime.

    Hashing a model's weights on every start took longer than loading them; a changed file (new size or mtime,
    as make and rsync judge it) is hashed again.
    """
    stats = [(str(Path(p).resolve()), st.st_size, st.st_mtime_ns) for p in paths for st in [Path(p).stat()]]
    memo = cache_dir() / "checksums" / f"{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]}.txt"
    if memo.exists():
        return memo.read_text(encoding="utf-8").strip()
    checksum = files_sha256(paths)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(checksum, encoding="utf-8")
    tmp.replace(memo)  # whole or absent, whatever runs beside it
    return checksum


def model_files(folder: Path) -> list[Path]:
    """A model folder's weights and config: what an export of it depends on."""
    return sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / "config.json"]


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A sibling folder to write into, renamed to `target` (replacing it) only when the block succeeds.

    A crash or an error never leaves a half-written `target`; the sibling is removed either way.
    """
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_dir() -> Path:
    """Folder for converted models and other derived, re-creatable files ($ED_CACHE_DIR overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "empathetic-chat"
    path = Path(os.environ.get("ED_CACHE_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_index_dir() -> Path:
    """The one index folder that build_index.py writes and everything else reads ($ED_INDEX_DIR overrides)."""
    return Path(os.environ.get("ED_INDEX_DIR", PROJECT_ROOT / "data" / "index"))


def data_dir_from_env() -> Path | None:
    """The Empathetic Dialogues folder named by $ED_DATA_DIR, if set."""
    return Path(os.environ["ED_DATA_DIR"]) if os.environ.get("ED_DATA_DIR") else None


def app_auth() -> str | None:
    """The web app's login as user:password ($ED_AUTH), if set."""
    return os.environ.get("ED_AUTH") or None


def package_dir(package: str) -> Path | None:
    """Folder of an installed package without importing it (some model packages import optional deps)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def limit_malloc_arenas(arenas: int = SERVER_MALLOC_ARENAS) -> bool:
    """Cap glibc's heaps ("arenas") for a long-running server; False where the C library is not glibc.

    glibc gives threads that contend for memory heaps of their own, up to 8 per core, and keeps what they freed.
    Gradio runs each step of a streamed reply in whichever worker thread is free, so tensors of every size end up
    in many heaps and the process's memory creeps up under load without any leak in Python.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def headless_matplotlib() -> None:
    """Start matplotlib on its file-only backend unless one is chosen ($MPLBACKEND), for a server that draws nothing.

    Gradio wraps every event in a switch to matplotlib's Agg backend: on the first request that imports matplotlib
    and, to read the backend it would restore, pyplot, a quarter of a second of the first reply. Named up front,
    the backend is read without pyplot.
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
