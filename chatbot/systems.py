"""The named systems (base, base+rag, tuned, tuned+rag, tuned+rag+select): what answers a message, defined once for every entry point."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class System:
    """A way to answer: with or without the tuned adapter, retrieved dialogues and reply selection."""

    name: str
    adapter: bool
    retrieval: bool
    select: bool = False  # show the selector's best of several generated and retrieved candidate replies


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("base", adapter=False, retrieval=False),
    System("base+rag", adapter=False, retrieval=True),
    System("tuned", adapter=True, retrieval=False),
    System("tuned+rag", adapter=True, retrieval=True),
    System("tuned+rag+select", adapter=True, retrieval=True, select=True),
)}


def get_system(name: str) -> System:
    """The system called `name`, with a clear error for unknown names."""
    try:
        return SYSTEMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown system {name!r}; choose one of: {', '.join(SYSTEMS)}") from None
