"""The one crisis-resources text, and the fixed replies built from it (the app and the CLI import these too)."""

from __future__ import annotations

# (who, what): the helplines every safety message gives, in this order.
RESOURCES: tuple[tuple[str, str], ...] = (
    ("US", "call or text 988 (Suicide & Crisis Lifeline), any time, day or night"),
    ("Elsewhere", "findahelpline.com lists free, confidential helplines near you"),
    ("In immediate danger", "call your local emergency number (for example 911, 112 or 999)"),
)
RESOURCES_TEXT = " ".join(f"{who}: {what}." for who, what in RESOURCES)
RESOURCES_MARKDOWN = "\n".join(
    f"- **{who}:** {what.replace('findahelpline.com', '[findahelpline.com](https://findahelpline.com)')}."
    for who, what in RESOURCES
)

CRISIS_REPLY = (
    "This is an automatic safety message, not a reply written by the chatbot's model. "
    "It sounds like you might be going through something really painful, and I'm glad you said it. "
    "You deserve support from a real person right now. "
    f"{RESOURCES_TEXT} "
    "It can also help to reach out to someone you trust, like a friend, family member or doctor, "
    "and let them know how you are feeling. "
    "I'm still here, and we can keep talking if you'd like."
)

# Added under a model reply when the screen is concerned but not sure (the `concern` tier).
CONCERN_CHECK_IN = (
    "Checking in (an automatic safety note): some of what you wrote made me want to ask directly. "
    "Are you thinking about ending your life or hurting yourself? If you are, please reach out now. "
    f"{RESOURCES_TEXT}"
)

SAFE_FALLBACK_REPLY = (
    "I'm sorry, I don't have the right words for that. "
    "Would you like to tell me more about how you're feeling?"
)
