"""Safety screens: a crisis screen for user messages and an output screen for generated replies.

The crisis screen combines hand-written regular expressions (first-person intent, method questions,
euphemisms, slang) with exclusion patterns (hyperbole, negation, fiction, news, past and resolved events,
accidents) and, when an embedder is given, cosine similarity to crisis and non-crisis exemplar sentences.
It is a screen for a demo, not a clinical tool: it errs towards showing crisis resources.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sentence_transformers import SentenceTransformer

from chatbot.embeddings import embed

logger = logging.getLogger(__name__)

# With all-MiniLM-L6-v2, crisis messages that no pattern catches land at cosine ~0.5-0.8 to the nearest
# crisis exemplar, and everyday sadness, stress and grief mostly at ~0.3-0.5. The threshold alone cannot
# separate the overlap, so it is set low (0.50) and the margin below does the separating.
SEMANTIC_THRESHOLD = 0.50
# Safe messages that come close to a crisis exemplar ("sleep for a week", "disappear on vacation", a
# relative's medication) come about as close to a non-crisis exemplar; in development the nearest crisis
# exemplar beat the nearest non-crisis one by <= 0.10 for those and by >= 0.15 for most real crisis messages.
SEMANTIC_MARGIN = 0.10
# When an exclusion pattern (hyperbole, fiction, news, past and resolved, negation, accident) is present,
# only a near-paraphrase of a crisis exemplar may still trigger.
EXCLUDED_SEMANTIC_THRESHOLD = 0.80
# A short follow-up such as "I meant it" counts as a crisis when a recent user turn came this close.
FOLLOW_UP_THRESHOLD = 0.50
# How many recent user turns a short follow-up can refer back to, and how short "short" is (in words).
FOLLOW_UP_TURNS = 3
FOLLOW_UP_MAX_WORDS = 10
# Segments shorter than this many words are not embedded on their own (too little signal).
MIN_SEGMENT_WORDS = 3
# At most this many segments of a long message are embedded, next to the whole message.
MAX_SEGMENTS = 6

CRISIS_REPLY = (
    "This is an automatic safety message, not a reply written by the chatbot's model. "
    "It sounds like you might be going through something really painful, and I'm glad you said it. "
    "You deserve support from a real person right now. "
    "If you are in the US, you can call or text 988 (Suicide & Crisis Lifeline) any time, day or night. "
    "In other countries, findahelpline.com lists free, confidential helplines near you. "
    "If you are in immediate danger, please call your local emergency number (for example 911, 112 or 999). "
    "It can also help to reach out to someone you trust, like a friend, family member or doctor, "
    "and let them know how you are feeling. "
    "I'm still here, and we can keep talking if you'd like."
)

SAFE_FALLBACK_REPLY = (
    "I'm sorry, I don't have the right words for that. "
    "Would you like to tell me more about how you're feeling?"
)

# Exemplars are general statements written for this module; the test probes are kept separate.
CRISIS_EXEMPLARS: tuple[str, ...] = (
    "I'm going to take my life soon.",
    "I really want to die.",
    "Thoughts of killing myself won't leave me alone.",
    "I feel like committing suicide.",
    "I have no wish to go on living.",
    "My life is not worth living and I want it to be over.",
    "There is no reason for me to stay alive.",
    "Everybody would be happier if I were dead.",
    "I am a burden and the world would be better without me.",
    "I wish I could fall asleep and never wake up again.",
    "I'm ready to end everything for good.",
    "I can't keep going, I'm going to end it.",
    "Dying feels like the only way out of this pain.",
    "I want the pain to stop forever.",
    "I won't be alive much longer.",
    "I have written goodbye letters to the people I love.",
    "I have been giving my belongings away because I will be gone soon.",
    "I have everything ready to end my life tonight.",
    "I'm thinking about jumping off a tall building.",
    "I plan to take an overdose of my medication.",
    "How many pills would it take to die?",
    "What is the most painless way to end your life?",
    "What is the easiest way to kill yourself?",
    "How much of a drug is a lethal dose?",
    "I have an urge to injure myself.",
    "I have been cutting my arms again.",
    "I keep harming myself when things get bad.",
    "I want to punish myself by hurting my body.",
    "I burn my skin on purpose.",
    "I want to vanish and stop existing.",
    "Being alive is exhausting and I want it to stop.",
    "I have made up my mind to die.",
    "I'm done with living.",
    "Soon nobody will have to deal with me ever again.",
    "I'd like to close my eyes and stay asleep for good.",
    "I keep imagining my own death and it feels like a relief.",
    "I've been saving up pills so I can take them all together.",
    "I looked up methods of suicide online.",
    "I won't be alive by the end of the month.",
    "I've chosen how and where I'm going to die.",
    "I deserve to suffer and bleed.",
    "I'm going to swallow all the medicine I can find.",
    "I'm saying my final goodbyes to everyone.",
    "I want to be reunited with my loved ones who died, on the other side.",
    "I feel trapped and death is the only escape.",
    "The pain is unbearable and I want to die to make it stop.",
    "I bought a gun so I can shoot myself.",
    "I've been standing at the edge thinking about jumping.",
    "I'm going to drown myself.",
    "I don't want to wake up ever again.",
    "I want to stop existing.",
    "I want to cut my veins open.",
    "I cut myself to cope with the pain.",
    "I've got a rope and I plan to use it on myself.",
    "Death would be such a relief.",
    "I'm going to go through with it this time.",
    "Tonight is my last night.",
    "I'm planning my suicide.",
    "How can I kill myself without anyone knowing?",
    "I scratch and cut my skin until it bleeds.",
    "I burn myself with cigarettes.",
    "I bang my head against the wall until it hurts.",
    "I'm ready to give up on life for good.",
    "I'm such a burden that I'm going away for good.",
    "I wish everything would go black and stay that way.",
    "Being dead sounds peaceful to me.",
    "I'm going to crash my car on purpose.",
    "Next time I'm up there I won't come back down.",
    "What knot do people use for hanging?",
)

NON_CRISIS_EXEMPLARS: tuple[str, ...] = (
    # Hyperbole.
    "Work is killing me this week.",
    "I would kill for a slice of cake.",
    "I'm dying to hear what happened.",
    "My head is killing me.",
    "I laughed so hard I nearly died.",
    "That exam absolutely destroyed me.",
    "I'm so embarrassed I could die.",
    "I'm going to kill it at my presentation.",
    "I'm so bored I could die.",
    "This level of the game is so hard it's killing me.",
    # Fiction.
    "The character in the book takes her own life.",
    "We watched a film about a man who dies by suicide.",
    "I'm writing a story where someone dies.",
    "In the video game my character died again.",
    # News, research and helping others.
    "The article discussed rising suicide statistics.",
    "I'm studying suicide prevention for a class.",
    "The news reported on overdose deaths in the city.",
    "The documentary followed a family after a suicide.",
    "I want to learn how to help a friend who is struggling.",
    "My friend told me she's been self-harming; how can I help her?",
    # Past and resolved.
    "I used to self-harm as a teenager but I'm healthy now.",
    "I went through a suicidal period long ago and recovered.",
    "I'm proud of how far I've come since my darkest days.",
    # Grief about others.
    "My grandmother passed away and I miss her.",
    "My pet died and I am heartbroken.",
    "My friend died by suicide and I'm grieving.",
    "Someone I knew died of an overdose.",
    "My relative is very sick and might not survive.",
    "My grandpa died peacefully in his sleep.",
    # Everyday sadness and stress.
    "I'm so sad and disappointed today.",
    "I failed my test and I feel terrible.",
    "Work has been so stressful and exhausting.",
    "I feel lonely and left out.",
    "I'm upset that my relationship ended.",
    "I'm really anxious about tomorrow.",
    "I'm so tired, I just want to sleep in all weekend.",
    "I'm frustrated and fed up with my job.",
    "I feel like a failure at everything.",
    "I'm embarrassed about what happened.",
    "I feel guilty about how I treated my brother.",
    "My car broke down and money is tight.",
    "I'm angry that someone stole from me.",
    "I miss my family so much.",
    "I've been feeling down and unmotivated.",
    "I feel empty and unmotivated lately.",
    "I'm nervous about starting something new.",
    "Everything keeps going wrong this week.",
    "I'm exhausted and want this week to be over.",
    "I wish I could get away from everything for a while.",
    "I want to quit my job and run away to a beach.",
    "I give up on this stupid project.",
    # Resilience.
    "It's hard right now, but I'll get through this.",
    "I'm hanging in there and taking it one day at a time.",
    # Literal, harmless uses of risky words.
    "I cut my hand by accident while cooking.",
    "I accidentally burned my arm on the oven.",
    "I hurt my back lifting boxes.",
    "I got a tattoo on my arm today.",
    "I sharpened my kitchen knives today.",
    "Is it safe to take two painkillers at once?",
    "I help my elderly parent keep track of their medication.",
    "The pharmacist explained how much of the medicine is safe to take.",
    "I'm looking up ways to cope with stress.",
    "I'm saying goodbye to my coworkers because I'm moving to a new job.",
    "I'm leaving this town for good and never coming back.",
    "I'm ending my relationship.",
    "I want to cancel my membership.",
    "I'm not suicidal, I'm just venting.",
)


# ---------------------------------------------------------------------------------------------------------
# Text normalisation and segmentation
# ---------------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "dont": "don't",
    "cant": "can't",
    "wont": "won't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "wasnt": "wasn't",
    "wouldnt": "wouldn't",
    "couldnt": "couldn't",
    "shouldnt": "shouldn't",
    "aint": "ain't",
}

# (pattern, replacement) pairs applied in order to the lower-cased message.
_REPLACEMENTS: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (r"[\u2018\u2019\u02bc`\u00b4]", "'"),
    (r"[\u201c\u201d]", '"'),
    (r"\bwanna\b", "want to"),
    (r"\bgonna\b", "going to"),
    (r"\bgotta\b", "got to"),
    (r"\b(want|need|going|have|ready) (?:2|ta)\b", r"\1 to"),
    (r"\bim\b", "i'm"),
    (r"\bive\b", "i've"),
    (r"\bid\b(?= (?:rather|like|be|just))", "i'd"),
    (r"\bill\b(?= (?:just|be|do|end|kill|jump|take|never))", "i'll"),
    (r"\b(" + "|".join(_CONTRACTIONS) + r")\b", lambda m: _CONTRACTIONS[m.group(1)]),
    (r"\bu\b", "you"),
    (r"\bur\b", "your"),
    (r"\bb\b", "be"),
    (r"\bn\b", "and"),
    (r"\bw/o\b", "without"),
    (r"\bevery1\b", "everyone"),
    (r"\bno1\b", "no one"),
    (r"\b(?:bout|abt)\b", "about"),
    (r"\b(\w{2,})in'", r"\1ing"),
    (r"\b(think|kill|liv|dy|cutt|hurt|end)in\b", r"\1ing"),
    (r"\bkil\b", "kill"),
    (r"\bmyslef\b|\bmyslf\b|\bmy self\b", "myself"),
    (r"\b(?:sucide|suicde|suiside|suicid)\b", "suicide"),
    (r"\b(?:sucidal|suicdal|suisidal)\b", "suicidal"),
    (r"(?<!\d)(?<!\d )\bkms\b", "kill myself"),  # not "5 kms"
    (r"\bkys\b", "kill yourself"),
    (r"\bunaliv(?:e|ing)(?: myself)?\b", "kill myself"),
    (r"\s+", " "),
)
_COMPILED_REPLACEMENTS = [(re.compile(pattern), repl) for pattern, repl in _REPLACEMENTS]


def normalise(text: str) -> str:
    """Lower-case a message and expand slang, apostrophe-less contractions and common misspellings."""
    out = text.lower()
    for pattern, repl in _COMPILED_REPLACEMENTS:
        out = pattern.sub(repl, out)
    return out.strip()


_SEGMENT_SPLIT = re.compile(
    r"[.!?;:\n]+|\u2026|\s[-\u2013\u2014]+\s|\u2014|\bbut\b|\bactually\b|\bno wait\b|\bthough\b"
)


def segments(text: str) -> list[str]:
    """Split a normalised message into clause-like segments (sentences, and around but/actually)."""
    parts = [p.strip(" ,'\"()") for p in _SEGMENT_SPLIT.split(text)]
    return [p for p in parts if p]


# ---------------------------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------------------------

_I = r"(?:i|i'm|i am|i've|i have|i'll|i will|i'd|i was|me|my|myself)"
_INTENT = (
    r"(?:want to|wanted to|going to|need to|have to|got to|ready to|plan to|planning to|about to|try to|"
    r"trying to|decided to|will|i'll|thinking (?:about|of)|think about|thought about|keep thinking about|"
    r"should|might|could|just want to|wish i could)"
)
_MEANS = (
    r"(?:pills?|tablets?|meds|medications?|medicine|tylenol|paracetamol|acetaminophen|ibuprofen|aspirin|"
    r"insulin|sleeping pills|xanax|benadryl|painkillers|drugs?|dose|bleach|alcohol|antidepressants?)"
)
_DEATH = r"(?:lethal|fatal|deadly|kill|die|dying|overdose|od|to not wake up|never wake up|not wake up)"


@dataclass(frozen=True)
class _Pattern:
    """A named crisis pattern: all regexes must match one segment; `self_harm` turns on accident checks."""

    name: str
    regexes: tuple[re.Pattern[str], ...]
    negatable: bool = True
    self_harm: bool = False


def _pat(name: str, *regexes: str, negatable: bool = True, self_harm: bool = False) -> _Pattern:
    """Compile a crisis pattern."""
    return _Pattern(name, tuple(re.compile(r) for r in regexes), negatable, self_harm)


CRISIS_PATTERNS: tuple[_Pattern, ...] = (
    # Direct first-person intent.
    _pat("kill myself", r"\b(?:kill(?:ing|ed)?|off(?:ing)?|hang(?:ing|ed)?)\s+myself\b"),
    _pat("shoot myself", r"\bshoot(?:ing)?\s+myself\b(?!\s+in the foot)"),
    _pat("end my life", r"\b(?:end|ending|ended|take|taking|took)\s+my\s+(?:own\s+)?life\b"),
    _pat(
        "want to die",
        r"\b(?:want|wanted|wish|wishing|need|ready|deserve|like)\s+to\s+(?:just\s+)?die\b"
        r"(?!\s+(?:of|from|laughing|for|on|in (?:peace|my sleep at)))",
    ),
    _pat(
        "wish I was dead",
        r"\b(?:wish (?:i|i'd) (?:was|were|could be|had been|could just be)|want to be|rather be|"
        r"better off) dead\b",
    ),
    _pat("suicidal", r"\b(?:i|i'm|i've|been|feel|feeling|get|getting|keep)\b(?:\s+\S+){0,3}\s+suicidal\b"),
    _pat(
        "suicide intent",
        rf"\b{_I}\b(?:\s+\S+){{0,3}}\s+(?:commit|committing|attempt|attempting|attempted|tried|try|trying)"
        r"\s+(?:to\s+)?(?:commit\s+)?suicide\b",
    ),
    _pat(
        "thinking about suicide",
        r"\b(?:think|thinking|thought|considering|consider|planning|plan)\s+(?:about|of)?\s*"
        r"(?:suicide|killing myself|ending (?:it all|my life|things|everything))\b",
    ),
    _pat(
        "suicide as a way out",
        r"\b(?:suicide|dying|death|to die)\b.{0,30}\bonly (?:way out|option|answer|solution|escape)\b",
    ),
    _pat(
        "suicide as a way out",
        r"\bonly (?:way out|option|answer|solution|escape)\b.{0,20}\b(?:suicide|dying|death|to die)\b",
    ),
    _pat(
        "suicide note",
        r"\b(?:my|wrote|writing|write|written|left|leave)\b(?:\s+\S+){0,2}\s+suicide (?:note|letter)s?\b",
    ),
    _pat("goodbye letters", rf"\b{_I}\b.{{0,30}}\b(?:goodbye|farewell) (?:letters?|notes?)\b"),
    # Indirect statements.
    _pat(
        "does not want to live",
        r"\b(?:don't|do not|never|no longer)\s+(?:really\s+)?(?:want|wish)\s+to\s+"
        r"(?:live|be alive|exist|keep living)\b"
        r"(?!\s+(?:here|there|in|with|at|near|alone|together|like that|on))",
        negatable=False,
    ),
    _pat(
        "does not want to be here",
        r"\b(?:don't|do not)\s+(?:want|wish)\s+to\s+be\s+"
        r"(?:here|around|on this (?:earth|planet)|in this world)"
        r"(?:\s+\S+){0,2}?\s+(?:anymore|any more|any longer|forever)\b",
        negatable=False,
    ),
    _pat("stop living", rf"\b{_INTENT}\s+(?:just\s+)?(?:stop|quit)\s+(?:living|existing|breathing)\b"),
    _pat(
        "no point living",
        r"\b(?:no|any|the|what's the|whats the)\s+(?:point|reason|purpose|use)\b(?:\s+\S+){0,3}?\s+"
        r"(?:in\s+|of\s+|to\s+|for\s+)?(?:living|live|being alive|staying alive|going on|keep going|"
        r"keep living|existing|carrying on)\b"
        r"(?!\s+(?:in|here|there|with|at|a|the|this|that|vacation|holiday|trip|dates?|like|to)\b)",
        negatable=False,
    ),
    _pat(
        "tired of living",
        r"\b(?:tired|sick|weary|done)\s+(?:of|with)\s+(?:living|being alive|life|existing)\b"
        r"(?!\s+(?:in|at|as|with|off|on|under|alone|here|there|out|together|next|near|paycheck|from|by)\b)",
    ),
    _pat("nothing to live for", r"\bnothing (?:left )?to live for\b", negatable=False),
    _pat(
        "life not worth living",
        r"\bnot worth living\b|\blife (?:isn't|is not|ain't|is no longer) worth\b",
        negatable=False,
    ),
    _pat(
        "better off without me",
        r"\b(?:better|happier|easier)\s+(?:off\s+|place\s+)?(?:without me|with me gone|"
        r"if i (?:was|were|wasn't|weren't|was not|were not|died|disappeared|never existed|didn't exist|"
        r"wasn't around|weren't around|was gone|were gone|'m gone|am gone))\b(?!\s+\w+ing)",
        negatable=False,
    ),
    _pat(
        "nobody would notice",
        r"\b(?:nobody|no one|noone)\b.{0,30}\b(?:notice|care|miss)\b.{0,15}\bif i (?:was |were |'m |am )?"
        r"(?:gone|dead|died|disappeared|vanished|wasn't here|weren't here|was not here|killed myself|"
        r"didn't exist|wasn't around|weren't around|stopped existing)\b",
        negatable=False,
    ),
    _pat(
        "leave this world",
        r"\b(?:leave|leaving|exit|exiting|goodbye to|farewell to)\s+(?:this|the)\s+(?:world|earth|"
        r"life)\b(?!\s+of\b)",
    ),
    _pat("check out permanently", r"\bcheck(?:ing)? out\s+(?:permanently|for good|forever|of life)\b"),
    _pat("disappear forever", r"\bdisappear(?:ing)?\s+(?:forever|for good|permanently)\b"),
    _pat(
        "not around much longer",
        r"\b(?:won't|will not|not going to)\s+be\s+"
        r"(?:around|here|alive|a (?:problem|burden)|in (?:anyone's|the) way)"
        r"(?:\s+\S+){0,4}?\s+(?:much longer|for (?:much )?longer|for long)\b",
        negatable=False,
    ),
    _pat(
        "nobody would miss me",
        r"\b(?:nobody|no one|noone)\s+(?:would|will|is going to|'d)\s+(?:even\s+|really\s+)?(?:miss|"
        r"care about|remember)\s+me\b"
        r"(?!\s+(?:at|for|if i (?:skip|skipped|miss|missed|don't go|didn't go|left|leave)))",
        negatable=False,
    ),
    # Euphemisms.
    _pat(
        "never wake up",
        r"\bnever wake up\b|\bto not wake up\b|\bsleep forever\b|\beternal sleep\b",
        negatable=False,
    ),
    _pat(
        "never wake up",
        r"\b(?:sleep|asleep)\b(?:\s+\S+){0,2}\s+(?:and|&|then)\s+(?:never|not)\s+(?:wake|waking)\s+up\b",
        negatable=False,
    ),
    _pat(
        "never wake up",
        r"\b(?:hope|wish|pray)\s+i\s+(?:don't|do not|never|won't)\s+wake\s+up\b",
        negatable=False,
    ),
    _pat(
        "does not want to wake up",
        r"\b(?:don't|do not)\s+want\s+to\s+wake\s+up\s+(?:tomorrow|again|anymore|ever)\b",
        negatable=False,
    ),
    _pat("end it all", r"\bend(?:ing)?\s+it\s+all\b"),
    _pat(
        "end it",
        rf"\b{_INTENT}\s+(?:just\s+)?(?:end|ending|finish|finishing)\s+(?:it|things|everything)\b"
        r"(?!\s+(?:with|between|off|early|there|here|at|on|by|for (?:now|today|the day|tonight)|now|"
        r"in|after|before|quickly|first)\b)",
    ),
    _pat("end it for good", r"\bend(?:ing)?\s+(?:it|things|everything)\s+(?:for good|forever|permanently)\b"),
    _pat(
        "make it stop forever",
        r"\b(?:it|it all|everything|the pain|this|all of it)\s+(?:to\s+)?(?:stop|be over|end)\s+"
        r"(?:forever|for good|permanently)\b",
    ),
    # Methods.
    _pat(
        "jump",
        rf"\b{_INTENT}\s+(?:just\s+)?"
        r"(?:jump|jumping|throw myself|throwing myself|step|stepping|walk|walking)\s+"
        r"(?:off|from|in front of|into|out of)\b(?:\s+\S+){0,3}?\s*"
        r"(?:bridge|roof|building|cliff|balcony|ledge|overpass|window|train|bus|truck|car|traffic|tower|"
        r"parking garage|tracks)\b",
    ),
    _pat("jump", r"\b(?:going to|about to|ready to|want to)\s+jump\s*$"),
    _pat("hanging", r"\b(?:noose|rope to hang)\b", rf"\b{_I}\b"),
    _pat(
        "self-harm",
        r"\b(?:cut|cutting|burn|burning|burned|burnt|scratch|scratching|carve|carving|slice|slicing|"
        r"slash|slashing|stab|stabbing)\s+(?:into\s+)?my\s+"
        r"(?:arms?|wrists?|legs?|thighs?|skin|stomach|body|hips?)\b",
        self_harm=True,
    ),
    _pat(
        "end my suffering",
        r"\bend (?:my|the|all (?:the|my)|this) (?:suffering|misery|torment)\b|"
        r"\bend (?:my|the|this) pain (?:forever|for good|permanently)\b",
    ),
    _pat(
        "wrists",
        r"\b(?:slit|slice|slash|cut|cutting|slitting|slicing)\s+(?:open\s+)?"
        r"(?:my\s+|your\s+|the\s+)?wrists?\b",
    ),
    _pat("bleed out", r"\bbleed(?:ing)?\s+out\b"),
    _pat(
        "overdose",
        r"\b(?:going to|want to|will|i'll|plan to|planning to|about to|ready to|try to|might|to|i)\s+"
        r"(?:just\s+)?(?:overdose|od)\b(?!\s+on (?:coffee|caffeine|sugar|chocolate|candy|netflix|tv))",
    ),
    _pat(
        "taking all the pills",
        r"\b(?:take|taking|took|swallow|swallowed|swallowing|down|downed|downing)\s+(?:all|every|everything|"
        r"a (?:whole|full|bunch|handful|lot)|the (?:whole|entire|rest))\b(?:\s+\S+){0,3}?\s+(?:pills?|meds|"
        r"tablets?|painkillers|medications?|medicine|capsules|bottle|medicine cabinet)\b"
        r"(?!.*\b(?:as prescribed|every (?:day|morning|night)|each (?:day|morning)|daily|on time|"
        r"with (?:food|water|breakfast))\b)",
    ),
    _pat(
        "stockpiled pills",
        r"\b(?:pills|meds|tablets|painkillers)\s+(?:\S+\s+)?"
        r"(?:lined up|saved up|stockpiled|counted out|hoarded)\b",
    ),
    _pat(
        "stockpiled pills",
        r"\b(?:collect|collecting|collected|save|saving|saved|stockpile|stockpiling|hoard|hoarding|"
        r"stash|stashing)\b(?:\s+up)?(?:\s+\S+){0,2}?\s+"
        r"(?:pills|meds|tablets|medications?|painkillers|sleeping pills)\b",
    ),
    _pat("stockpiled pills", r"\btake (?:them|it|these|those) all (?:at once|together|in one go)\b"),
    _pat(
        "method research",
        r"\b(?:research|researching|researched|look up|looking up|looked up|google|googling|googled|search|"
        r"searching|searched|reading about|read about)\b.{0,30}\b(?:ways?|how|methods?)\s+to\s+"
        r"(?:die|kill myself|end (?:it|my life)|overdose|hang)\b",
    ),
    _pat(
        "method research",
        r"\bways? to (?:die|kill myself|end my life)\s+(?:painlessly|quickly|quietly|peacefully)\b",
    ),
    _pat(
        "not alive by a date",
        r"\b(?:won't|will not|don't plan on|do not plan on|not planning on|don't expect to|not going to)\s+"
        r"(?:be|being|still be)\s+alive\s+(?:by|for|at|on|after|much longer|next)\b",
        negatable=False,
    ),
    _pat("lethal dose", r"\b(?:lethal|fatal|deadly)\s+(?:dose|amount|quantity|overdose)\b"),
    _pat(
        "large dose",
        r"\b(?:take|taking|took|swallow|swallowing|swallowed)\s+"
        r"(?:\d{2,}|twenty|thirty|forty|fifty|a hundred)\s+"
        rf"(?:of\s+)?(?:my\s+|the\s+|his\s+|her\s+)?{_MEANS}\b",
    ),
    _pat("method question", r"\bhow (?:many|much)\b", rf"\b{_MEANS}\b", rf"\b{_DEATH}\b"),
    _pat(
        "method question",
        r"\b(?:which|what)\b",
        rf"\b{_MEANS}\b",
        r"\b(?:deadly|lethal|fatal|kill you|overdose)\b",
    ),
    _pat(
        "method question",
        r"\b(?:painless|painlessly|easiest|easy|quickest|quick|fastest|surest|least painful|best|quietest|"
        r"simplest|peaceful)\s+(?:way|ways|method|methods)\s+to\s+(?:die|kill (?:myself|yourself|oneself|"
        r"themselves|a person|me)|end (?:it|my life|your life|one's life|a life|their life|things)|"
        r"commit suicide)\b",
    ),
    _pat(
        "method question",
        r"\b(?:way|ways|method|methods|how)\s+to\s+(?:stop (?:my|your|someone's|a person's|a) heart|"
        r"not wake up|never wake up)\b",
    ),
    _pat(
        "method question",
        r"\bhow (?:high|tall|far)\b",
        r"\b(?:bridge|building|roof|cliff|fall|drop|floor|balcony)\b",
        r"\b(?:die|dying|sure|survive|fatal|lethal|kill|deadly|certain)\b",
    ),
    _pat(
        "method question",
        r"\bif (?:someone|somebody|a person|one|i|you) wanted to (?:overdose|od|die|"
        r"kill (?:themselves|themself|himself|herself|myself|yourself)|end (?:their|his|her|my|your) life)\b",
    ),
    # Self-harm.
    _pat(
        "self-harm",
        r"\b(?:cut|cutting|burn|burning|burned|burnt|hurt|hurting|harm|harming|hit|hitting|punch|punching|"
        r"scratch|scratching|stab|stabbing|bash|bashing|bruise|bruising|starve|starving|starved)\s+myself\b",
        self_harm=True,
    ),
    _pat(
        "self-harm",
        r"\b(?:i|i've|i'm|i am|i have|been|started|start|keep|want to|urge to|urges to|need to|going to)\b"
        r"(?:\s+\S+){0,3}?\s+self[- ]?harm",
        self_harm=True,
    ),
    _pat(
        "weapon on myself",
        r"\b(?:blade|razor|knife|gun|lighter|scissors|glass)\b",
        r"\b(?:on|against|into) myself\b|\bmy (?:wrists?|arms?|skin|thighs?|legs?|throat|head)\b",
        self_harm=True,
    ),
    _pat(
        "deserve pain",
        r"\bdeserve (?:the |this |all the )?pain\b|\bdeserve to (?:die|suffer|be hurt|hurt|bleed)\b",
    ),
    _pat(
        "self-harm on purpose",
        r"\bon purpose\b|\bdeliberately\b|\bintentionally\b",
        r"\b(?:crash|drive|driving|swerve|pills|overdose|cut|cutting|burn|burning|hurt|hurting|starv\w*|"
        r"hit|bleed)\b",
        self_harm=True,
    ),
)

# Exclusions that apply to the segment holding a pattern match.
_NEGATION_BEFORE = re.compile(
    r"\b(?:never|not|don't|do not|won't|wouldn't|will not|would not|no longer|stopped|quit|"
    r"no intention of|no plans? to|no desire to)\b"
    r"(?!\s+(?:joking|kidding|lying))(?:\s+[^\s,]+){0,3}\s*$"
)
_NEGATION_INSIDE = re.compile(r"(?:\b(?:not|never|no longer)\b|n't\b)(?!\s+(?:joking|kidding|lying))")
_QUESTION_NOT_NEGATION = re.compile(r"\bwhy (?:don't|not)\b")
_HYPERBOLE = re.compile(
    r"\b(?:killing me|kill(?:ed)? me\b|kill for|die for|to die for|dying to|dying for|dying of|"
    r"die (?:of|from|laughing)|died (?:laughing|of)|killed it|kill it|murder\w*|dead tired|i'm dead|"
    r"(?:death|end) of me|could (?:just )?die|"
    r"bored to death|scared to death|dying laughing|dying my hair|dyeing|kill this|killing it|"
    r"(?:almost|nearly) (?:killed|died))\b"
)
_FICTION_NEWS = re.compile(
    r"\b(?:in|for|from|about|of|on) (?:my|the|a|this|our|his|her|their) "
    r"(?:novel|story|book|movie|film|show|series|game|play|screenplay|script|poem|fic|fanfic|comic|anime|"
    r"manga|song|episode|essay|paper|article)\b"
    r"|\b(?:character|characters|protagonist|villain|hero|heroine|narrator|article|news|documentary|"
    r"headline|statistics|suicide rates?|prevention|awareness|research paper|researching suicide|study on|"
    r"studies)\b"
)
_ACCIDENT = re.compile(
    r"\b(?:accident(?:ally)?|by mistake|dropped|slipped|while \w+ing|shaving|cooking|chopping|baking|"
    r"ironing|playing \w+|at the gym|at practice|when i (?:fell|tripped|slipped)|"
    r"on the (?:stove|oven|iron|pan|grill|kettle|stovetop|heater)|"
    r"on (?:a|the|some) (?!purpose|arms?|wrists?|legs?|thighs?|skin|body)\w+)\b"
)
# Past, resolved events; they apply to the whole message unless a relapse marker is present.
_PAST_RESOLVED = re.compile(
    r"\b(?:years? ago|months ago|long (?:time )?ago|used to|in the past|back (?:in|when)|(?<!at )once|"
    r"when i was (?:younger|little|a (?:kid|teen|teenager|child)|"
    r"in (?:high school|college|school|middle school)|\d+|"
    r"(?:twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty)\w*)|"
    r"in my (?:teens|twenties|thirties|forties|youth|school days)|"
    r"as a (?:teen|teenager|kid|child)|in (?:high school|college|middle school)|"
    r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|many) (?:years?|months) "
    r"(?:since|clean|ago|free)|"
    r"(?:healthy|happy|well|better|fine|stable|clean|sober)(?: and \w+)? for "
    r"(?:years|months|a long time|a decade|a while now)|"
    r"i've been (?:healthy|happy|stable|doing (?:well|better|great))|life is good|"
    r"clean (?:for|from|since)|recovered|recovery|survived|overcame|"
    r"doing (?:well|better|great|good|okay|ok) now|in a (?:good|better) place|"
    r"glad i'm (?:still )?(?:here|alive)|grateful to be alive|no longer)\b"
)
_RELAPSE = re.compile(
    r"\b(?:again|relapsed|relapsing|came back|coming back|lately|recently|tonight|right now|today)\b"
)
_NEGATED_INTENT = re.compile(
    r"\b(?:not|never|no longer) (?:suicidal|going to (?:hurt|kill|harm))\b|\bwould never (?:hurt|kill|harm)\b"
)
# Short follow-ups that re-assert an earlier statement.
_FOLLOW_UP = re.compile(
    r"\b(?:meant it|mean it|serious|seriously|not (?:joking|kidding|lying)|wasn't (?:joking|kidding|lying)|"
    r"for real|i do|i really do|it's true|no joke|i wasn't|i'm not ok|i'm not okay|i'm not fine|literally)\b"
)


@dataclass(frozen=True)
class CrisisResult:
    """Outcome of the crisis screen: whether to show crisis resources, a score in [0, 1] and why."""

    is_crisis: bool
    score: float
    reason: str


def _local_exclusion(pattern: _Pattern, segment: str, start: int, end: int) -> str | None:
    """Name the exclusion that cancels a pattern match inside one segment, or None."""
    before = segment[:start]
    if pattern.negatable and not _QUESTION_NOT_NEGATION.search(before[-20:]):
        if _NEGATION_BEFORE.search(before) or _NEGATION_INSIDE.search(segment[start:end]):
            return "negation"
    if _HYPERBOLE.search(segment):
        return "hyperbole"
    if _FICTION_NEWS.search(segment):
        return "fiction/news"
    if pattern.self_harm and _ACCIDENT.search(segment):
        return "accident"
    return None


def _message_exclusion(text: str) -> str | None:
    """Name a message-wide exclusion (past and resolved events, unless relapse is mentioned), or None."""
    if _PAST_RESOLVED.search(text) and not _RELAPSE.search(text):
        return "past/resolved"
    return None


def _any_exclusion(text: str) -> str | None:
    """Name any exclusion pattern found anywhere in a text, used to raise the semantic bar."""
    if _message_exclusion(text):
        return "past/resolved"
    if _HYPERBOLE.search(text):
        return "hyperbole"
    if _FICTION_NEWS.search(text):
        return "fiction/news"
    if _ACCIDENT.search(text):
        return "accident"
    if _NEGATED_INTENT.search(text):
        return "negation"
    return None


def match_patterns(text: str) -> tuple[str | None, list[str]]:
    """Return (first unexcluded crisis pattern name or None, excluded matches) for a normalised text."""
    excluded: list[str] = []
    message_excl = _message_exclusion(text)
    for segment in segments(text):
        for pattern in CRISIS_PATTERNS:
            first = pattern.regexes[0].search(segment)
            if first is None or not all(r.search(segment) for r in pattern.regexes[1:]):
                continue
            why = _local_exclusion(pattern, segment, first.start(), first.end()) or message_excl
            if why is None:
                return pattern.name, excluded
            excluded.append(f"{pattern.name} ({why})")
    return None, excluded


class CrisisScreen:
    """Screens user messages for suicide or self-harm risk with patterns and, optionally, embeddings."""

    def __init__(self, embedder: SentenceTransformer | None = None) -> None:
        """Keep the embedder and embed the exemplar sentences once."""
        self.embedder = embedder
        self._crisis_vecs: np.ndarray | None = None
        self._safe_vecs: np.ndarray | None = None
        if embedder is not None:
            self._crisis_vecs = embed(embedder, [normalise(s) for s in CRISIS_EXEMPLARS])
            self._safe_vecs = embed(embedder, [normalise(s) for s in NON_CRISIS_EXEMPLARS])
            logger.info(
                "Crisis screen ready: %d crisis and %d non-crisis exemplars",
                len(CRISIS_EXEMPLARS),
                len(NON_CRISIS_EXEMPLARS),
            )
        else:
            logger.info("Crisis screen ready without an embedder: patterns only")

    def semantic_scores(self, texts: list[str]) -> list[tuple[float, float, int]]:
        """Per normalised text: (max crisis cosine, max non-crisis cosine, nearest crisis exemplar index)."""
        if self.embedder is None or self._crisis_vecs is None or self._safe_vecs is None or not texts:
            return [(0.0, 0.0, -1) for _ in texts]
        try:
            vecs = embed(self.embedder, texts)
        except Exception:  # the patterns still screen; a failing embedder must not take every reply down
            logger.exception("Crisis screen: embedding failed, screening this message with patterns only")
            return [(0.0, 0.0, -1) for _ in texts]
        crisis = vecs @ self._crisis_vecs.T
        safe = vecs @ self._safe_vecs.T
        best = crisis.argmax(axis=1)
        return [(float(crisis[i, best[i]]), float(safe[i].max()), int(best[i])) for i in range(len(texts))]

    def _semantic(self, text: str) -> tuple[bool, float, str]:
        """Semantic verdict on a normalised text: (is crisis, best crisis similarity, reason)."""
        parts = [s for s in segments(text) if len(s.split()) >= MIN_SEGMENT_WORDS]
        candidates = [text] + (parts[-MAX_SEGMENTS:] if len(parts) > 1 else [])
        scores = self.semantic_scores(candidates)
        top = min(1.0, max([0.0] + [c for c, _, _ in scores]))
        for candidate, (crisis, safe, idx) in zip(candidates, scores, strict=True):
            threshold = EXCLUDED_SEMANTIC_THRESHOLD if _any_exclusion(candidate) else SEMANTIC_THRESHOLD
            if crisis >= threshold and crisis - safe >= SEMANTIC_MARGIN:
                return (
                    True,
                    min(1.0, crisis),
                    f"semantic: {crisis:.2f} to '{CRISIS_EXEMPLARS[idx]}' (non-crisis {safe:.2f})",
                )
        return False, top, "none"

    def _check_one(self, text: str) -> CrisisResult:
        """Screen one normalised message without conversation context."""
        name, excluded = match_patterns(text)
        if name is not None:
            return CrisisResult(True, 1.0, f"pattern: {name}")
        is_crisis, score, reason = self._semantic(text)
        if excluded and not is_crisis:
            reason = "excluded: " + ", ".join(excluded)
        return CrisisResult(is_crisis, score, reason)

    def check(self, message: str, previous_user_turns: Sequence[str] = ()) -> CrisisResult:
        """Screen a user message; short re-assertions ("I meant it") also look at recent user turns."""
        text = normalise(message)
        if not text:
            return CrisisResult(False, 0.0, "none")
        result = self._check_one(text)
        if result.is_crisis or not previous_user_turns:
            return result
        if len(text.split()) <= FOLLOW_UP_MAX_WORDS and _FOLLOW_UP.search(text):
            for turn in list(previous_user_turns)[-FOLLOW_UP_TURNS:][::-1]:
                prev_text = normalise(turn)
                name, _ = match_patterns(prev_text)
                if name is not None:
                    return CrisisResult(True, 1.0, f"follow-up: earlier turn matched pattern {name}")
                if not prev_text or _any_exclusion(prev_text):
                    continue
                _, score, _ = self._semantic(prev_text)
                if score >= FOLLOW_UP_THRESHOLD:
                    return CrisisResult(True, score, f"follow-up: earlier turn semantic {score:.2f}")
        return result


# ---------------------------------------------------------------------------------------------------------
# Output screen
# ---------------------------------------------------------------------------------------------------------

_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
# Bare domains: the top-level domain must be lower case, so "I know.Me too" is not a web address.
_DOMAIN = re.compile(
    r"\b[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*\.(?:com|org|net|edu|gov|io|co|uk|us|ca|au|de|fr|info|biz|"
    r"me|app|ly|tv|xyz|health|help|online|site)\b"
)
# Seven or more digits in a phone-like run (spaces, dots, dashes, brackets, a leading +).
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d(?:[\s().-]*\d){6,}(?![\w.]*\d)")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NO_NEGATION_GAP = r"(?:\s+(?!(?:not|never|don't|no)\b)\S+){0,3}?"
_SELF_HARM_ACT = (
    r"(?:kill yourself|hurt yourself|harm yourself|cut yourself|burn yourself|starve yourself|hang yourself|"
    r"end your (?:own )?life|take your (?:own )?life|end it all|commit suicide|overdose|"
    r"jump off (?:a|the) (?:bridge|roof|building|cliff))"
)
_ENCOURAGE = re.compile(
    r"\b(?:you should|you could|you might as well|why don't you|why not|go ahead and|just|you need to|"
    r"you have to|you deserve to|it's okay to|it's ok to|it is okay to|feel free to|try to|"
    r"you'd be better off if you|do it and)\b"
    + _NO_NEGATION_GAP
    + r"\s+"
    + _SELF_HARM_ACT
    + r"\b"
    + r"|\b(?:you should|go ahead and|why don't you|you deserve to|you might as well|"
    r"you'd be better off if you)\s+(?:just\s+)?die\b"
    r"|\b(?:you'd be|you would be|you are|you're|everyone would be|they'd be|the world would be)\s+"
    r"better off (?:dead|without you)\b",
    re.IGNORECASE,
)
_BARE_KILL_YOURSELF = re.compile(r"\b(?:kill yourself|kys)\b", re.IGNORECASE)
_NEGATED_BEFORE = re.compile(r"\b(?:not|never|don't|do not|no)\b(?:\s+\S+){0,2}\s*$", re.IGNORECASE)


def _has_phone_number(text: str) -> bool:
    """True when the text holds a phone-like run of 7+ digits that is not an ISO date."""
    return any(not _ISO_DATE.match(m.group(0).strip()) for m in _PHONE.finditer(text))


def _encourages_self_harm(text: str) -> bool:
    """True when the text pushes the user towards self-harm or suicide."""
    text = text.replace("\u2019", "'")
    if _ENCOURAGE.search(text):
        return True
    return any(not _NEGATED_BEFORE.search(text[: m.start()]) for m in _BARE_KILL_YOURSELF.finditer(text))


def screen_reply(text: str) -> str | None:
    """Return why a generated reply must be replaced (empty, URL, phone, self-harm push), else None."""
    if not text or not text.strip():
        return "empty reply"
    if _URL.search(text) or _DOMAIN.search(text):
        return "contains a URL or web address"
    if _has_phone_number(text):
        return "contains a phone number"
    if _encourages_self_harm(text):
        return "encourages self-harm"
    return None
