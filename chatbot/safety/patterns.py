"""The crisis screen's patterns: normalisation rules, clause splitting, crisis patterns and their exclusions.

Only declarations live here; chatbot.safety.screen applies them. The patterns are a high-precision backstop
behind the learned classifier: each should fire only on an explicit statement, and an exclusion (negation,
hyperbole, fiction, news, the resolved past, an accident) cancels a match only inside the clause it governs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------
# Normalisation: slang, apostrophe-less contractions, misspellings and disguised spellings
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

# Disguised letters inside a word ("k1ll", "mys3lf", "d!e", "s*icide").
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "@": "a", "$": "s", "!": "i", "*": "i"}

# (pattern, replacement) pairs applied in order to the lower-cased message.
REPLACEMENTS: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (r"[\u2018\u2019\u02bc`\u00b4]", "'"),
    (r"[\u201c\u201d]", '"'),
    # Letters spelled out one by one ("k.i.l.l", "s u i c i d e") are joined.
    (r"\b(?:[a-z][ .\-_*]){3,}[a-z]\b", lambda m: re.sub(r"[ .\-_*]", "", m.group(0))),
    (r"(?<=[a-z])[0134@$!*](?=[a-z])", lambda m: _LEET[m.group(0)]),
    (r"\bs[uia]{1,3}c[ia]{0,2}d(e|es|al)\b", r"suicid\1"),
    (r"\bsewer ?slide\b", "suicide"),
    (r"\b2nite\b|\b2night\b", "tonight"),
    (r"\brn\b", "right now"),
    (r"\bimma\b|\bima\b", "i'm going to"),
    (r"\byeet(?:ing)? myself\b", "throw myself"),
    (r"\b(?:6|six) feet under\b", "dead"),
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
    (r"\b(?:off|end)(?:ing)? myself\b", "kill myself"),
    (r"\s+", " "),
)

# Sentences as punctuation ends them: the parts the classifier scores. Cut at "but" as well, a clause reads as a
# statement of its own that training never showed it ("..., but that's behind me" -> "that's behind me").
SCORED_SPLIT = re.compile(r"[.!?;:\n]+|\u2026|\s[-\u2013\u2014]+\s|\u2014")
# For the patterns, sentences and the parts around but/actually/though, then the clauses within a sentence that
# an exclusion can govern.
SENTENCE_SPLIT = re.compile(SCORED_SPLIT.pattern + r"|\bbut\b|\bactually\b|\bno wait\b|\bthough\b")
CLAUSE_SPLIT = re.compile(r",|\band\b|\bso\b|\bbecause\b|\bnow\b|\bthen\b")

# ---------------------------------------------------------------------------------------------------------
# Crisis patterns
# ---------------------------------------------------------------------------------------------------------

# First person ("my" is left out: "my friend attempted suicide" is about someone else).
_I = r"(?:i|i'm|i am|i've|i have|i'll|i will|i'd|i was|me|myself)"
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
class CrisisPattern:
    """A named crisis pattern: all regexes must match one sentence; `self_harm` turns on accident checks."""

    name: str
    regexes: tuple[re.Pattern[str], ...]
    negatable: bool = True
    self_harm: bool = False


def _pat(name: str, *regexes: str, negatable: bool = True, self_harm: bool = False) -> CrisisPattern:
    """Compile a crisis pattern."""
    return CrisisPattern(name, tuple(re.compile(r) for r in regexes), negatable, self_harm)


CRISIS_PATTERNS: tuple[CrisisPattern, ...] = (
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
        # The speaker's own thoughts: a first-person subject, or none ("thinking about suicide again").
        rf"(?:^|\b{_I}\b(?:\s+\S+){{0,3}}?\s+)"
        r"(?:think|thinking|thought|considering|consider|planning|plan)\s+(?:about|of)?\s*"
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
    # Direct phrases in Spanish, French, German and Portuguese (the embedder is English-only; see README).
    _pat(
        "other language",
        r"(?<!no )\b(?:quiero|quisiera|voy a|ganas de|pensando en|pienso en)\s+"
        r"(?:morir(?:me)?|matarme|suicidarme|quitarme la vida)\b"
        r"|\bme (?:quiero|voy a) (?:morir|matar|suicidar)\b|\bno quiero (?:seguir )?viv(?:ir|iendo)\b"
        r"|\bacabar con mi vida\b|\bpreferir[ií]a estar muert[oa]\b",
        negatable=False,
    ),
    _pat(
        "other language",
        r"\bje veux mourir\b|\b(?:envie de|veux|vais|pense à|penser à) (?:me tuer|me suicider|mourir|en finir)\b"
        r"|\bje ne veux plus vivre\b|\bmettre fin à mes jours\b|\bpense au suicide\b"
        r"|\bpréférerais être mort",
        negatable=False,
    ),
    _pat(
        "other language",
        r"\bich (?:will|möchte|werde) (?:jetzt |heute )?sterben\b|\b(?:mich|mir) (?:\w+ ){0,2}(?:umbringen|töten)\b"
        r"|\bbringe mich um\b|\bnicht mehr leben\b|\bmir das leben (?:zu )?nehmen\b"
        r"|\b(?:denke|gedanken) an (?:selbstmord|suizid)\b|\bsuizidgedanken\b|\bwäre lieber tot\b",
        negatable=False,
    ),
    _pat(
        "other language",
        r"(?<!não )\b(?:quero|vou|penso em|pensando em|vontade de)\s+(?:morrer|me matar|me suicidar|matar-me|suicidar-me)\b"
        r"|\bnão quero mais viver\b|\btirar (?:a )?minha (?:própria )?vida\b|\bpreferia estar mort[oa]\b",
        negatable=False,
    ),
)


# Exclusions; each cancels a match only inside the clause that holds it (see chatbot.safety.screen).
NEGATION_BEFORE = re.compile(
    r"\b(?:never|not|don't|do not|won't|wouldn't|will not|would not|no longer|stopped|quit|"
    r"no intention of|no plans? to|no desire to)\b"
    r"(?!\s+(?:joking|kidding|lying))(?:\s+[^\s,]+){0,3}\s*$"
)
NEGATION_INSIDE = re.compile(r"(?:\b(?:not|never|no longer)\b|n't\b)(?!\s+(?:joking|kidding|lying))")
QUESTION_NOT_NEGATION = re.compile(r"\bwhy (?:don't|not)\b")
HYPERBOLE = re.compile(
    r"\b(?:killing me|kill(?:ed)? me\b|kill for|die for|to die for|dying to|dying for|dying of|"
    r"die (?:of|from|laughing)|died (?:laughing|of)|killed it|kill it|murder\w*|dead tired|i'm dead|"
    r"(?:death|end) of me|could (?:just )?die|"
    r"bored to death|scared to death|dying laughing|dying my hair|dyeing|kill this|killing it|"
    r"(?:almost|nearly) (?:killed|died))\b"
)
FICTION_NEWS = re.compile(
    r"\b(?:in|for|from|about|of|on) (?:my|the|a|this|our|his|her|their) "
    r"(?:novel|story|book|movie|film|show|series|game|play|screenplay|script|poem|fic|fanfic|comic|anime|"
    r"manga|song|episode|essay|paper|article)\b"
    r"|\b(?:character|characters|protagonist|villain|hero|heroine|narrator|article|news|documentary|"
    r"headline|statistics|suicide rates?|prevention|awareness|research paper|researching suicide|study on|"
    r"studies)\b"
)
ACCIDENT = re.compile(
    r"\b(?:accident(?:ally)?|by mistake|dropped|slipped|while \w+ing|shaving|cooking|chopping|baking|"
    r"ironing|playing \w+|at the gym|at practice|when i (?:fell|tripped|slipped)|"
    r"on the (?:stove|oven|iron|pan|grill|kettle|stovetop|heater)|"
    r"on (?:a|the|some) (?!purpose|arms?|wrists?|legs?|thighs?|skin|body)\w+)\b"
)
# Past, resolved events, unless the clause also marks a relapse.
PAST_RESOLVED = re.compile(
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
    r"glad i'm (?:still )?(?:here|alive)|grateful to be alive)\b"
)
RELAPSE = re.compile(
    r"\b(?:again|relapsed|relapsing|came back|coming back|lately|recently|tonight|right now|today)\b"
)
# A fiction or news frame that opens a sentence governs all of it ("In my novel, the hero says ...").
FICTION_FRAME = re.compile(
    r"^(?:in|for|from) (?:my|the|a|this|our|his|her|their) (?:novel|story|book|movie|film|show|series|game|play|"
    r"screenplay|script|poem|fic|fanfic|comic|anime|manga|song|episode|essay|article)\b"
)
# Short follow-ups that re-assert an earlier statement.
FOLLOW_UP = re.compile(
    r"\b(?:meant it|mean it|serious|seriously|not (?:joking|kidding|lying)|wasn't (?:joking|kidding|lying)|"
    r"for real|i do|i really do|it's true|no joke|i wasn't|i'm not ok|i'm not okay|i'm not fine|literally)\b"
)
