"""Safety screens: a crisis screen for user messages and an output screen for generated replies.

- `screen`: the crisis screen (learned classifier + pattern backstop; tiers `crisis` and `concern`).
- `classifier`: the logistic regression on MiniLM embeddings and its saved artifact (assets/safety/).
- `patterns`: the backstop's regular expressions and exclusions (declarations only).
- `output`: the output screen for generated replies.
- `resources`: the one crisis-resources text, and the fixed replies built from it.
- `sentences/`: the labelled training sentences and the frozen held-out set.
"""

from chatbot.safety.classifier import ClassifierLoadError, SafetyClassifier
from chatbot.safety.output import screen_reply
from chatbot.safety.resources import (
    CONCERN_CHECK_IN,
    CRISIS_REPLY,
    RESOURCES_MARKDOWN,
    RESOURCES_TEXT,
    SAFE_FALLBACK_REPLY,
)
from chatbot.safety.screen import CrisisResult, CrisisScreen, match_patterns, normalise

__all__ = [
    "CONCERN_CHECK_IN",
    "CRISIS_REPLY",
    "RESOURCES_MARKDOWN",
    "RESOURCES_TEXT",
    "SAFE_FALLBACK_REPLY",
    "ClassifierLoadError",
    "CrisisResult",
    "CrisisScreen",
    "SafetyClassifier",
    "match_patterns",
    "normalise",
    "screen_reply",
]
