"""The crisis screen: a learned classifier over every sentence, the whole message and the recent turns, with
high-precision patterns as a backstop. Two tiers: `crisis` (the fixed reply) and `concern` (a check-in line).

It is a screen for a demo, not a clinical tool: it errs towards showing crisis resources.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chatbot.embeddings import Embedder, embed
from chatbot.safety.classifier import CONCERN, CRISIS, NONE, SafetyClassifier
from chatbot.safety.patterns import (
    ACCIDENT,
    CLAUSE_SPLIT,
    CRISIS_PATTERNS,
    FICTION_FRAME,
    FICTION_NEWS,
    FOLLOW_UP,
    HYPERBOLE,
    NEGATION_BEFORE,
    NEGATION_INSIDE,
    PAST_RESOLVED,
    QUESTION_NOT_NEGATION,
    RELAPSE,
    REPLACEMENTS,
    SCORED_SPLIT,
    SENTENCE_SPLIT,
    CrisisPattern,
)

logger = logging.getLogger(__name__)

# A short follow-up ("I meant it") looks back this many user turns; "short" is at most this many words.
FOLLOW_UP_TURNS = 3
FOLLOW_UP_MAX_WORDS = 10
# The recent user turns joined with the message are scored too; risk that only shows across turns is a concern.
CONTEXT_TURNS = 2
# Sentences longer than this are scored in windows of this many words (the embedder reads 128 tokens).
WINDOW_WORDS = 48
# At most this many distinct sentences and windows of one message are embedded; past that only the patterns
# screen (about 100,000 characters of distinct sentences, a few seconds of embedding on a 2-core CPU).
MAX_SCORED_PARTS = 2048

_COMPILED_REPLACEMENTS = [(re.compile(pattern), repl) for pattern, repl in REPLACEMENTS]


def normalise(text: str) -> str:
    """Lower-case a message and expand slang, contractions, misspellings and disguised spellings."""
    out = text.lower()
    for pattern, repl in _COMPILED_REPLACEMENTS:
        out = pattern.sub(repl, out)
    return out.strip()


def sentences(text: str, split: re.Pattern = SENTENCE_SPLIT) -> list[str]:
    """Split a normalised message into sentences (by default also around but/actually/though)."""
    parts = [p.strip(" ,'\"()") for p in split.split(text)]
    return [p for p in parts if p]


@dataclass(frozen=True)
class CrisisResult:
    """Outcome of the crisis screen: the tier ('crisis', 'concern' or 'none'), a score in [0, 1] and why."""

    tier: str
    score: float
    reason: str

    @property
    def is_crisis(self) -> bool:
        """Whether the fixed crisis reply replaces the model."""
        return self.tier == CRISIS

    @property
    def is_concern(self) -> bool:
        """Whether the model replies with a check-in line added."""
        return self.tier == CONCERN


NOT_FLAGGED = CrisisResult(NONE, 0.0, "none")


def _clause(sentence: str, start: int, end: int) -> tuple[str, int, int]:
    """The clause of `sentence` around the span [start, end), and the span's offsets inside it."""
    splits = list(CLAUSE_SPLIT.finditer(sentence))
    left = max([m.end() for m in splits if m.end() <= start], default=0)
    right = min([m.start() for m in splits if m.start() >= end], default=len(sentence))
    return sentence[left:right], start - left, end - left


def _exclusion(pattern: CrisisPattern, clause: str, start: int, end: int) -> str | None:
    """Name the exclusion that cancels a match inside its own clause, or None."""
    before = clause[:start]
    if pattern.negatable and not QUESTION_NOT_NEGATION.search(before[-20:]):
        if NEGATION_BEFORE.search(before) or NEGATION_INSIDE.search(clause[start:end]):
            return "negation"
    if HYPERBOLE.search(clause):
        return "hyperbole"
    if FICTION_NEWS.search(clause):
        return "fiction/news"
    if pattern.self_harm and ACCIDENT.search(clause):
        return "accident"
    if PAST_RESOLVED.search(clause) and not RELAPSE.search(clause):
        return "past/resolved"
    return None


def match_patterns(text: str) -> tuple[str | None, list[str]]:
    """Return (first unexcluded crisis pattern name or None, excluded matches) for a normalised text."""
    excluded: list[str] = []
    for sentence in dict.fromkeys(sentences(text)):  # a repeated sentence is matched once
        framed = FICTION_FRAME.search(sentence) is not None
        for pattern in CRISIS_PATTERNS:
            first = pattern.regexes[0].search(sentence)
            if first is None or not all(r.search(sentence) for r in pattern.regexes[1:]):
                continue
            why = "fiction/news" if framed else _exclusion(pattern, *_clause(sentence, first.start(), first.end()))
            if why is None:
                return pattern.name, excluded
            excluded.append(f"{pattern.name} ({why})")
    return None, excluded


def message_parts(text: str) -> list[str]:
    """What the classifier scores for one normalised message: the whole, each sentence, windows of long ones."""
    parts = [text.strip(" ,'\"().!?;:")]  # a one-sentence message is then scored once
    for sentence in sentences(text, SCORED_SPLIT):
        words = sentence.split()
        parts.extend(" ".join(words[i:i + WINDOW_WORDS]) for i in range(0, len(words), WINDOW_WORDS // 2))
    unique = list(dict.fromkeys(parts))
    if len(unique) > MAX_SCORED_PARTS:
        logger.warning("Crisis screen: %d parts in one message; the classifier scores the first %d",
                       len(unique), MAX_SCORED_PARTS)
    return unique[:MAX_SCORED_PARTS]


class CrisisScreen:
    """Screens user messages for suicide or self-harm risk; without an embedder, with the patterns only."""

    def __init__(self, embedder: Embedder | None = None, classifier: SafetyClassifier | None = None):
        """Load the shipped classifier when an embedder is given and no classifier is; embed as that classifier reads."""
        self.classifier = classifier if classifier is not None or embedder is None else SafetyClassifier.load()
        self.embedder = embedder if embedder is None or self.classifier is None else self.classifier.encoder(embedder)
        logger.info("Crisis screen ready: %s", "classifier and patterns" if self.classifier else "patterns only")

    def _probabilities(self, texts: list[str]) -> np.ndarray | None:
        """P(crisis) per normalised text, or None when there is no classifier or embedding fails."""
        if self.embedder is None or self.classifier is None:
            return None
        try:
            return self.classifier.probabilities(texts, embed(self.embedder, texts))
        except Exception:  # the patterns still screen; a failing embedder must not take every reply down
            logger.exception("Crisis screen: embedding failed, screening this message with patterns only")
            return None

    def check(self, message: str, previous_user_turns: Sequence[str] = ()) -> CrisisResult:
        """Screen a whole user message in the light of the user's previous turns (oldest first)."""
        text = normalise(message)
        if not text:
            return NOT_FLAGGED
        name, excluded = match_patterns(text)
        if name is not None:
            return CrisisResult(CRISIS, 1.0, f"pattern: {name}")
        previous = [t for t in (normalise(turn) for turn in list(previous_user_turns)[-FOLLOW_UP_TURNS:]) if t]
        follow_up = len(text.split()) <= FOLLOW_UP_MAX_WORDS and FOLLOW_UP.search(text) is not None
        earlier = previous[::-1] if follow_up else []
        for turn in earlier:
            earlier_name, _ = match_patterns(turn)
            if earlier_name is not None:
                return CrisisResult(CRISIS, 1.0, f"follow-up: an earlier turn matched pattern {earlier_name}")
        parts = message_parts(text)
        context = [" ".join([*previous[-CONTEXT_TURNS:], text])] if previous else []
        probs = self._probabilities(parts + earlier + context)
        if probs is None:
            return CrisisResult(NONE, 0.0, "excluded: " + ", ".join(excluded)) if excluded else NOT_FLAGGED
        best = int(np.argmax(probs[: len(parts)]))
        score, tier = float(probs[best]), self.classifier.tier(float(probs[best]))
        shown = parts[best] if len(parts[best]) <= 80 else parts[best][:77] + "..."
        result = CrisisResult(tier, score, f"classifier: {score:.2f} on '{shown}'" if tier != NONE else "none")
        if tier == CRISIS:
            return result
        for prob in probs[len(parts): len(parts) + len(earlier)]:
            if self.classifier.tier(float(prob)) == CRISIS:
                return CrisisResult(CRISIS, float(prob), f"follow-up: an earlier turn scored {prob:.2f}")
        if tier == NONE and context and self.classifier.tier(float(probs[-1])) == CRISIS:
            return CrisisResult(CONCERN, float(probs[-1]), f"context: the recent turns together score {probs[-1]:.2f}")
        if tier == NONE and excluded:
            return CrisisResult(NONE, score, "excluded: " + ", ".join(excluded))
        return result


@dataclass(frozen=True)
class ScreenScores:
    """How a screen does on labelled sentences: each tier's recall and false alarms, and what it got wrong."""

    n_crisis: int
    n_safe: int
    recall: float  # crisis sentences that get the crisis reply
    false_alarms: float  # non-crisis sentences that get the crisis reply
    recall_any_tier: float  # crisis sentences that get the crisis reply or the check-in line
    false_alarms_any_tier: float
    missed: tuple[str, ...]  # crisis sentences below the crisis tier, with their result
    flagged: tuple[str, ...]  # non-crisis sentences at the crisis or concern tier, with their result

    def to_dict(self) -> dict:
        """The figures (not the sentence lists) for a manifest."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items()
                if k not in ("missed", "flagged")}

    def summary(self) -> str:
        """One line: recall and false alarms at the crisis tier, then at either tier."""
        return (f"crisis tier: recall {self.recall:.1%} of {self.n_crisis}, false alarms {self.false_alarms:.1%} "
                f"of {self.n_safe}; crisis or concern: recall {self.recall_any_tier:.1%}, "
                f"false alarms {self.false_alarms_any_tier:.1%}")


def score_screen(screen: CrisisScreen, texts: Sequence[str], is_crisis: Sequence[bool]) -> ScreenScores:
    """Screen each text on its own and count each tier's hits and false alarms."""
    results = [screen.check(text) for text in texts]
    pos = [(t, r) for t, r, c in zip(texts, results, is_crisis) if c]
    neg = [(t, r) for t, r, c in zip(texts, results, is_crisis) if not c]

    def share(rows: list, tiers: tuple[str, ...]) -> float:
        return sum(r.tier in tiers for _, r in rows) / max(1, len(rows))

    def line(text: str, r: CrisisResult) -> str:
        return f"{text!r}: {r.tier} ({r.reason}, {r.score:.2f})"

    return ScreenScores(
        len(pos), len(neg), share(pos, (CRISIS,)), share(neg, (CRISIS,)), share(pos, (CRISIS, CONCERN)),
        share(neg, (CRISIS, CONCERN)), tuple(line(t, r) for t, r in pos if not r.is_crisis),
        tuple(line(t, r) for t, r in neg if r.tier != NONE),
    )
