"""onnxruntime-genai through its C API: the calls the served engine makes, with the GIL released.

onnxruntime-genai's Python bindings hold the GIL through every model call (`append_tokens`, `generate_next_token`;
see src/python/python.cpp upstream, which never releases it), so while one request reads its prompt no other Python
thread runs: not the app's event loop (clients time out), not another user's request, not Compare's other side.
ctypes releases the GIL around each foreign call, so the same library, called here through its documented C API
(`ort_genai_c.h`), lets requests run side by side. Only what `chatbot.engine` needs is wrapped.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import weakref
from ctypes import POINTER, byref, c_bool, c_char_p, c_double, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path

import numpy as np

FLOAT32 = 1  # OgaElementType_float32


class OgaError(RuntimeError):
    """An error reported by onnxruntime-genai."""


_SIGNATURES = {  # name: (argument types, return type); an OgaResult* return is NULL on success
    "OgaResultGetError": ([c_void_p], c_char_p),
    "OgaDestroyResult": ([c_void_p], None),
    "OgaCreateConfig": ([c_char_p, POINTER(c_void_p)], c_void_p),
    "OgaConfigOverlay": ([c_void_p, c_char_p], c_void_p),
    "OgaDestroyConfig": ([c_void_p], None),
    "OgaCreateModelFromConfig": ([c_void_p, POINTER(c_void_p)], c_void_p),
    "OgaDestroyModel": ([c_void_p], None),
    "OgaCreateAdapters": ([c_void_p, POINTER(c_void_p)], c_void_p),
    "OgaLoadAdapter": ([c_void_p, c_char_p, c_char_p], c_void_p),
    "OgaDestroyAdapters": ([c_void_p], None),
    "OgaCreateGeneratorParams": ([c_void_p, POINTER(c_void_p)], c_void_p),
    "OgaGeneratorParamsSetSearchNumber": ([c_void_p, c_char_p, c_double], c_void_p),
    "OgaGeneratorParamsSetSearchBool": ([c_void_p, c_char_p, c_bool], c_void_p),
    "OgaDestroyGeneratorParams": ([c_void_p], None),
    "OgaCreateGenerator": ([c_void_p, c_void_p, POINTER(c_void_p)], c_void_p),
    "OgaDestroyGenerator": ([c_void_p], None),
    "OgaSetActiveAdapter": ([c_void_p, c_void_p, c_char_p], c_void_p),
    "OgaGenerator_AppendTokens": ([c_void_p, POINTER(c_int32), c_size_t], c_void_p),
    "OgaGenerator_GenerateNextToken": ([c_void_p], c_void_p),
    "OgaGenerator_IsDone": ([c_void_p], c_bool),
    "OgaGenerator_TokenCount": ([c_void_p], c_size_t),
    "OgaGenerator_GetLogits": ([c_void_p, POINTER(c_void_p)], c_void_p),
    "OgaGenerator_SetLogits": ([c_void_p, c_void_p], c_void_p),
    "OgaCreateTensorFromBuffer": ([c_void_p, POINTER(c_int64), c_size_t, c_int, POINTER(c_void_p)], c_void_p),
    "OgaTensorGetType": ([c_void_p, POINTER(c_int)], c_void_p),
    "OgaTensorGetShapeRank": ([c_void_p, POINTER(c_size_t)], c_void_p),
    "OgaTensorGetShape": ([c_void_p, POINTER(c_int64), c_size_t], c_void_p),
    "OgaTensorGetData": ([c_void_p, POINTER(c_void_p)], c_void_p),
    "OgaDestroyTensor": ([c_void_p], None),
}


@functools.cache
def library() -> ctypes.CDLL:
    """The library the installed Python package ships (importing the package also registers its shutdown at exit)."""
    import onnxruntime_genai

    folder = Path(onnxruntime_genai.__file__).parent
    found = sorted(folder.glob("*onnxruntime-genai.*"))  # libonnxruntime-genai.so / .dylib, onnxruntime-genai.dll
    if not found:
        raise OgaError(f"no onnxruntime-genai library next to {onnxruntime_genai.__file__}")
    lib = ctypes.CDLL(str(found[0]))  # CDLL, not PyDLL: the GIL is released during every call
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


def version() -> str:
    """The installed onnxruntime-genai version."""
    import onnxruntime_genai

    return onnxruntime_genai.__version__


def _check(result: int | None) -> None:
    """Raise the library's error message when a call returned an OgaResult."""
    if result:
        lib = library()
        message = lib.OgaResultGetError(result).decode(errors="replace")
        lib.OgaDestroyResult(result)
        raise OgaError(message)


def _create(function: str, *arguments: object) -> int:
    """Call an `Oga...(…, T** out)` constructor; the new handle."""
    handle = c_void_p()
    _check(getattr(library(), function)(*arguments, byref(handle)))
    return handle.value


def _owned(owner: object, handle: int, destroy: str) -> int:
    """Destroy `handle` when `owner` is collected (not at exit: the library shuts down by itself then)."""
    weakref.finalize(owner, getattr(library(), destroy), handle).atexit = False
    return handle


def _read_tensor(tensor: int) -> np.ndarray:
    """A float32 OgaTensor as a numpy copy; the tensor is destroyed."""
    lib = library()
    try:
        kind, rank = c_int(), c_size_t()
        _check(lib.OgaTensorGetType(tensor, byref(kind)))
        if kind.value != FLOAT32:
            raise OgaError(f"expected float32 logits, got element type {kind.value}")
        _check(lib.OgaTensorGetShapeRank(tensor, byref(rank)))
        shape = (c_int64 * rank.value)()
        _check(lib.OgaTensorGetShape(tensor, shape, rank.value))
        data = c_void_p()
        _check(lib.OgaTensorGetData(tensor, byref(data)))
        count = math.prod(shape)
        return np.ctypeslib.as_array((ctypes.c_float * count).from_address(data.value)).reshape(tuple(shape)).copy()
    finally:
        lib.OgaDestroyTensor(tensor)


class Model:
    """An exported model folder, loaded with `overlay` (JSON merged into its genai_config.json)."""

    def __init__(self, path: Path, overlay: dict | None = None):
        """Load the model; OgaError when the folder cannot be loaded."""
        lib = library()
        config = _create("OgaCreateConfig", str(path).encode())
        try:
            if overlay:
                _check(lib.OgaConfigOverlay(config, json.dumps(overlay).encode()))
            self.handle = _owned(self, _create("OgaCreateModelFromConfig", config), "OgaDestroyModel")
        finally:
            lib.OgaDestroyConfig(config)


class Adapters:
    """Run-time adapters of a model, each loaded under a name."""

    def __init__(self, model: Model):
        """An empty adapter set for `model`."""
        self.model = model  # the model outlives its adapters
        self.handle = _owned(self, _create("OgaCreateAdapters", model.handle), "OgaDestroyAdapters")

    def load(self, path: Path, name: str) -> None:
        """Load an `.onnx_adapter` file as `name`."""
        _check(library().OgaLoadAdapter(self.handle, str(path).encode(), name.encode()))


class Generator:
    """One generator: `batch_size` rows decoded together, plain greedy search (the caller picks tokens by logits)."""

    def __init__(self, model: Model, max_length: int, batch_size: int, adapters: Adapters | None = None,
                 adapter: str | None = None):
        """Create it; with `adapters`, the one named `adapter` is active for this generator only."""
        lib = library()
        params = _create("OgaCreateGeneratorParams", model.handle)
        try:
            for name, value in {"max_length": max_length, "batch_size": batch_size, "repetition_penalty": 1.0}.items():
                _check(lib.OgaGeneratorParamsSetSearchNumber(params, name.encode(), float(value)))
            _check(lib.OgaGeneratorParamsSetSearchBool(params, b"do_sample", False))
            self.handle = _owned(self, _create("OgaCreateGenerator", model.handle, params), "OgaDestroyGenerator")
        finally:
            lib.OgaDestroyGeneratorParams(params)
        self.model, self.adapters = model, adapters  # both outlive the generator
        if adapters is not None and adapter is not None:
            _check(lib.OgaSetActiveAdapter(self.handle, adapters.handle, adapter.encode()))

    def append_tokens(self, tokens: np.ndarray) -> None:
        """Read (batch, length) prompt tokens: the model runs here, without the GIL."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        _check(library().OgaGenerator_AppendTokens(self.handle, ids.ctypes.data_as(POINTER(c_int32)), ids.size))

    def generate_next_token(self) -> None:
        """Pick each row's next token from the current logits and run the model on it, without the GIL."""
        _check(library().OgaGenerator_GenerateNextToken(self.handle))

    def is_done(self) -> bool:
        """Whether every row has ended (end-of-sequence or max_length)."""
        return bool(library().OgaGenerator_IsDone(self.handle))

    def token_count(self) -> int:
        """Tokens in each row so far (prompt and generated)."""
        return int(library().OgaGenerator_TokenCount(self.handle))

    def get_logits(self) -> np.ndarray:
        """The last position's logits, (batch, 1, vocab)."""
        return _read_tensor(_create("OgaGenerator_GetLogits", self.handle))

    def set_logits(self, logits: np.ndarray) -> None:
        """Replace the last position's logits (same number of values as `get_logits`)."""
        values = np.ascontiguousarray(logits, dtype=np.float32)
        shape = (c_int64 * values.ndim)(*values.shape)
        tensor = _create("OgaCreateTensorFromBuffer", values.ctypes.data_as(c_void_p), shape, values.ndim, FLOAT32)
        try:
            _check(library().OgaGenerator_SetLogits(self.handle, tensor))
        finally:
            library().OgaDestroyTensor(tensor)
