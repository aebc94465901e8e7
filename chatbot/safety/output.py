"""The output screen: a generated reply that must never reach the user is named here and then replaced.

It catches empty replies, web addresses and phone numbers (a small model invents them), encouragement of
self-harm, dismissal of the person's worth and dangerous advice (stop eating, take all the pills, ...).
"""

from __future__ import annotations

import re

_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
# Bare domains: the top-level domain must be lower case, so "I know.Me too" is not a web address.
_DOMAIN = re.compile(
    r"\b[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*\.(?:com|org|net|edu|gov|io|co|uk|us|ca|au|de|fr|info|biz|"
    r"me|app|ly|tv|xyz|health|help|online|site)\b"
)
# Seven or more digits in a phone-like run (spaces, dots, dashes, brackets, a leading +).
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d(?:[\s().-]*\d){6,}(?![\w.]*\d)")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Up to three words between a push ("you should", "just") and the act, none of them a negation.
_GAP = r"(?:\s+(?!(?:not|never|don't|no)\b)\S+){0,3}?\s+"
_PUSH = (
    r"\b(?:you should|you could|you can|you might as well|you might want to|why don't you|why not|go ahead and|"
    r"just|try to|you need to|you have to|you deserve to|it's okay to|it's ok to|it is okay to|"
    r"it's fine to|feel free to|do it and|you'd be better off if you)\b"
)
_SELF_HARM_ACT = (
    r"(?:kill yourself|hurt yourself|harm yourself|cut yourself|burn yourself|starve yourself|hang yourself|"
    r"punish yourself|end your (?:own )?life|take your (?:own )?life|end it all|commit suicide|overdose|"
    r"jump off (?:a|the) (?:bridge|roof|building|cliff|balcony))"
)
_DANGEROUS_ACT = (
    r"(?:take (?:all|every one|the whole bottle|a handful|a bunch|lots|a lot|double|extra)\b(?:\s+of)?(?:\s+\S+){0,2}?\s+"
    r"(?:pills|meds|medication|medicine|tablets|painkillers)|"
    r"stop (?:eating|drinking water|taking your (?:meds|medication|medicine|pills))"
    r"(?!\s+(?:so much|junk|sugar|fast food|late|out|meat|after))|"
    r"skip (?:meals|eating|your (?:meds|medication|pills))|not eat(?:ing)? (?:at all|for days|anything)|"
    r"drink (?:bleach|until you (?:pass out|black out|forget))|mix (?:your |the )?(?:pills|meds|medication) with alcohol|"
    r"give up on (?:life|living)|stop (?:living|existing|breathing))"
)
# Each of these is unsafe unless a negation stands just before it ("it's not true that nobody would miss you").
_UNSAFE = (
    ("encourages self-harm", re.compile(
        _PUSH + _GAP + _SELF_HARM_ACT + r"\b|\b(?:kill yourself|kys)\b"
        r"|\b(?:you should|go ahead and|why don't you|you deserve to|you might as well)\s+(?:just\s+)?die\b",
        re.I)),
    ("dismisses the person's worth", re.compile(
        r"\b(?:nobody|no one|noone)\s+(?:would|will|is going to|'d|really)?\s*(?:even\s+|really\s+)?"
        r"(?:miss|care about|notice|cares? about|cares? if|mourn)\s+(?:you|if you)\b"
        r"|\b(?:nobody|no one)\s+(?:loves|wants|needs|likes)\s+you\b"
        r"|\byou(?:'d| would| will|'ll)? be better off (?:gone|dead|not here|not existing|not around|"
        r"if you (?:were|was|weren't)\s+(?:gone|dead|not (?:here|around|alive)|here|around|alive))\b"
        r"|\b(?:everyone|everybody|the world|they|your family|your friends|people)(?:'d| would| will|'ll)? be "
        r"(?:better|happier) (?:off )?(?:without you|if you (?:were|was) gone)\b"
        r"|\byou(?:'re| are) (?:just )?(?:worthless|a burden|a waste of (?:space|air|time)|pathetic|useless|"
        r"unlovable|better off dead)\b"
        r"|\byou (?:don't|do not) deserve to (?:live|be alive|exist|be happy|be loved)\b"
        r"|\bthe world (?:doesn't|does not) need you\b|\byour life (?:is|isn't) (?:worthless|not worth living)\b",
        re.I)),
    ("gives dangerous advice", re.compile(_PUSH + _GAP + _DANGEROUS_ACT + r"\b", re.I)),
)
_NEGATED_BEFORE = re.compile(r"\b(?:not|never|don't|do not|no|isn't|wasn't|can't|cannot|shouldn't|won't|wouldn't)\b(?:\s+\S+){0,3}\s*$", re.I)


def _has_phone_number(text: str) -> bool:
    """True when the text holds a phone-like run of 7+ digits that is not an ISO date."""
    return any(not _ISO_DATE.match(m.group(0).strip()) for m in _PHONE.finditer(text))


def unsafe_content(text: str) -> str | None:
    """Name what makes a reply unsafe (self-harm push, worth dismissal, dangerous advice), else None."""
    text = text.replace("\u2019", "'")
    for why, pattern in _UNSAFE:
        if any(not _NEGATED_BEFORE.search(text[: m.start()]) for m in pattern.finditer(text)):
            return why
    return None


def screen_reply(text: str) -> str | None:
    """Return why a generated reply must be replaced (empty, URL, phone, unsafe content), else None."""
    if not text or not text.strip():
        return "empty reply"
    if _URL.search(text) or _DOMAIN.search(text):
        return "contains a URL or web address"
    if _has_phone_number(text):
        return "contains a phone number"
    return unsafe_content(text)
