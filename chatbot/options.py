"""Command-line options as dataclass fields, the way trl's scripts declare them: `HfArgumentParser` makes the flags.

The options several commands share are defined here once, so `--base-model`, `--adapter`, `--index-dir`, `--k`,
`--preset`, `--data-dir` and `--device` are spelled, defaulted and documented alike in every root script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from chatbot.bot import DEFAULT_K, EmpatheticChatbot
from chatbot.generation import DEFAULT_PRESET, PRESETS
from chatbot.models import DEFAULT_BASE_MODEL


def option(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field that HfArgumentParser turns into a documented flag (`flag`: more add_argument keywords)."""
    return field(default=default, metadata={"help": help, **flag})


def data_dir_option() -> Any:
    """--data-dir."""
    return option(None, "Empathetic Dialogues: a folder with train/valid/test.csv or the release .tar.gz "
                        "(unset: $ED_DATA_DIR, then data/empatheticdialogues/, then a download)")


def index_dir_option() -> Any:
    """--index-dir."""
    return option(None, "the retrieval index folder (unset: $ED_INDEX_DIR, else data/index/)")


def base_model_option() -> Any:
    """--base-model."""
    return option(DEFAULT_BASE_MODEL, "smollm2-135m-instruct (packaged), gpt2, distilgpt2, a hub id or a local folder")


def k_option() -> Any:
    """--k."""
    return option(DEFAULT_K, "retrieved dialogues per prompt")


def preset_option(default: str = DEFAULT_PRESET) -> Any:
    """--preset."""
    return option(default, "generation settings preset", choices=list(PRESETS))


def device_option() -> Any:
    """--device."""
    return option(None, "cpu, cuda, ... (unset: $ED_DEVICE, else CUDA when available)")


def at_least(arguments: object, minimum: int, *names: str) -> None:
    """Raise a ValueError naming the first flag among `names` whose value is below `minimum`."""
    for name in names:
        value = getattr(arguments, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, not {value}")


@dataclass
class BotArguments:
    """The bot that answers and how: the flags the terminal chat and the app share."""

    base_model: str = base_model_option()
    adapter: str = option("default", "peft adapter folder of the 'tuned' systems: 'default' (the shipped one) "
                                     "or 'none'")
    index_dir: str | None = index_dir_option()
    k: int = k_option()
    preset: str = preset_option()
    device: str | None = device_option()

    def __post_init__(self) -> None:
        """Refuse a k below 1 before the model loads."""
        at_least(self, 1, "k")

    def load(self) -> EmpatheticChatbot:
        """The bot these flags name (a missing index or unfit default adapter degrades with a note)."""
        return EmpatheticChatbot.from_pretrained(self.base_model, self.adapter, self.index_dir, self.device, self.k)


class Parser(HfArgumentParser):
    """HfArgumentParser whose option checks (ValueErrors in `__post_init__`) end in a usage error, not a traceback."""

    def parse(self, argv: list[str] | None = None) -> tuple:
        """The dataclasses (and a Namespace of any flags added by hand), or exit 2 with the reason."""
        try:
            return self.parse_args_into_dataclasses(argv)
        except ValueError as err:
            self.error(str(err))
