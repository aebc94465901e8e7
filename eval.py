"""Evaluate chatbot systems on the Empathetic Dialogues test split: perplexity, reply quality, emotion, retrieval.

`python eval.py --limit 200` scores base, base+rag, tuned and tuned+rag on the same seeded sample of test
listener replies and writes results.json, results.md, charts and samples.md to assets/results/.
Per-system caches under <out>/cache/ let an interrupted run resume.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chatbot import metrics, options
from chatbot.bot import EmpatheticChatbot, Reply
from chatbot.contexts import example_contexts
from chatbot.data import (
    LISTENER,
    SPEAKER,
    Conversation,
    DataError,
    Example,
    Turn,
    examples_of,
    load_conversations,
    sample,
)
from chatbot.embeddings import EMBEDDER_NAME, embed, load_embedder
from chatbot.emotion import load_emotion_detector
from chatbot.generation import GenerationSettings, preset
from chatbot.models import (
    ModelLoadError,
    default_adapter,
    load_chat_model,
    read_adapter_meta,
)
from chatbot.prompts import PROMPT_FORMAT_VERSION, encode_example
from chatbot.retriever import QUERY_TURNS, IndexLoadError, Retriever, query_text
from chatbot.runtime import ASSETS_DIR, DEFAULT_SEED, default_index_dir, files_sha256, set_seed
from chatbot.scoring import perplexity
from chatbot.selector import ResponseSelector, candidate_sets, load_response_selector, precision_at_1
from chatbot.systems import SYSTEMS, System

logger = logging.getLogger("eval")
EVAL_EXTRAS = ("sacrebleu", "rouge_score")  # requirements-eval.txt: reply metrics only (not --perplexity-only)
RAG_SUFFIX = "+rag"
SELECT_SUFFIX = "+select"  # only after +rag: selection weighs the retrieved listener replies too
CANDIDATES = 100  # P@1,100: the gold reply among 99 other test replies (Rashkin et al., 2019)
CANDIDATE_POOL = 1000  # test replies the distractors are drawn from
DEFAULT_BATCH_SIZE = 8  # replies decoded together: on 2 cores a batch of 8 costs far less than 8 single replies
# Fixed prompts for samples.md: the original report's two messages, single turns and multi-turn dialogues.
SAMPLE_PROMPTS: list[list[str]] = [
    ["I had such a hard day at work today. Things keep piling up."],
    ["My dog died today. I am so distraught."],
    ["I finally got the job offer I was hoping for!"],
    ["My best friend moved across the country and I really miss her."],
    ["I heard strange noises downstairs last night and couldn't sleep."],
    ["I forgot my mother's birthday and I feel terrible about it."],
    ["My little brother beat me at chess for the first time."],
    ["I have an exam tomorrow and I don't feel ready at all."],
    ["Someone left a kind note on my car this morning."],
    ["I'm so annoyed, my neighbour keeps parking in my spot."],
    ["I tried a new recipe and it turned out great!"],
    ["I'm nervous about meeting my partner's parents next week."],
    ["I lost my wallet on the bus.", "Oh no, did you get it back?", "No, and my ID was in it."],
    ["We adopted a kitten yesterday!", "That's lovely! What's her name?", "Mochi. She sleeps all day."],
    ["My grandfather is in hospital.", "I'm sorry to hear that. How is he doing?",
     "Better today, but the doctors are still worried."],
    ["I got a promotion at work.", "Congratulations! You must be proud.", "I am, but I'm scared I won't be good at it."],
    ["My car broke down on the highway.", "That sounds stressful. Were you alone?", "Yes, at night, in the rain."],
    ["I ran my first marathon last weekend.", "Wow, how did it go?", "I finished, slowly, but I finished."],
    ["My friend didn't invite me to her wedding.", "That must hurt. Do you know why?", "She said it was family only."],
    ["I can't stop thinking about a mistake I made at work.", "What happened?",
     "I sent a report with the wrong numbers to my boss."],
]
# Published figures printed beside ours; their protocols differ from ours (own splits, tokenizations, models).
ANCHORS = [
    {"system": "Rashkin et al. 2019, pretrained Transformer fine-tuned on ED", "perplexity": 21.24, "avg_bleu": 6.27,
     "p_at_1_100": 65.92, "protocol": "their test split; PPL over their BPE tokens; AVG BLEU = mean of BLEU-1..4; "
     "P@1,100 with a BERT retriever"},
    {"system": "MoEL (Lin et al., 2019)", "word_perplexity": 36.81, "emotion_accuracy": 31.02, "bleu4": 2.73,
     "protocol": "own ED split; word-level PPL; emotion from the full dialogue context (32 classes)"},
    {"system": "CEM (Sabour et al., 2022)", "distinct_1": 0.66, "distinct_2": 2.99,
     "protocol": "own ED split; Distinct-n over its test replies"},
    {"system": "GPT-2 117M fine-tuned (TransferTransfo, as reported in DiffusEmp)", "distinct_1": 2.81,
     "distinct_2": 17.22, "bertscore": 0.5634, "protocol": "DiffusEmp's ED split and tokenization"},
]


@dataclass(frozen=True)
class SystemSpec:
    """One evaluated system (which parts answer, see chatbot.systems) on a base model, with its adapter folder."""

    system: System
    base_model: str
    adapter: Path | None

    @property
    def slug(self) -> str:
        """A file-name-safe cache folder name; named after the adapter, so runs with other adapters reuse it."""
        name = self.system.name.removesuffix(SELECT_SUFFIX).removesuffix(RAG_SUFFIX)
        name = f"tuned-{self.adapter.name}" if self.adapter else name
        rag = (RAG_SUFFIX if self.system.retrieval else "") + (SELECT_SUFFIX if self.system.select else "")
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) + rag


@dataclass
class EvalArguments:
    """What to evaluate, on which sample, with which settings, and where the results go."""

    systems: list[str] = field(default_factory=lambda: list(SYSTEMS), metadata={
        "help": "base, base+rag, tuned, tuned+rag, or any base model name (gpt2, distilgpt2, a folder), "
                "optionally with +rag"})
    adapters: list[str] | None = options.option(
        None, "adapter folders the tuned systems use (unset: the shipped one); several allowed")
    base_model: str = options.base_model_option()
    limit: int = options.option(200, "seeded sample of test listener replies (0 = every one of the test split)")
    preset: str = options.preset_option("greedy")
    k: int = options.k_option()
    data_dir: str | None = options.data_dir_option()
    index_dir: str | None = options.index_dir_option()
    out: str = options.option(str(ASSETS_DIR / "results"), "where results and caches go")
    seed: int = options.option(DEFAULT_SEED, "seed for the sample and the distractors")
    device: str | None = options.device_option()
    perplexity_only: bool = options.option(
        False, "score only the gold replies' perplexity (no generation, emotion or retrieval measures)")
    cache_dir: str | None = options.option(None, "per-system caches (unset: <out>/cache); runs may share one")
    samples: int = options.option(len(SAMPLE_PROMPTS), "fixed prompts replied to in samples.md "
                                                       f"(0 = no samples.md; at most {len(SAMPLE_PROMPTS)})")
    batch_size: int = options.option(DEFAULT_BATCH_SIZE, "test replies decoded together, left-padded "
                                                         "(s/reply is then a batch's time per reply)")

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers before anything loads."""
        options.at_least(self, 0, "limit", "samples")
        options.at_least(self, 1, "batch_size", "k")


def parse_systems(names: Sequence[str], adapters: Sequence[Path], base_model: str) -> list[SystemSpec]:
    """System specs for names like base, tuned+rag or gpt2; tuned systems expand to one per adapter."""
    specs = []
    for name in names:
        select = name.endswith(RAG_SUFFIX + SELECT_SUFFIX)
        name = name.removesuffix(SELECT_SUFFIX)
        model, rag = (name[: -len(RAG_SUFFIX)], True) if name.endswith(RAG_SUFFIX) else (name, False)
        if model == "tuned":
            if not adapters:
                raise ModelLoadError("A tuned system needs an adapter: none is shipped yet; pass --adapters "
                                     "(train one with train.py)")
            for adapter in adapters:
                label = "tuned" if len(adapters) == 1 else f"tuned[{adapter.name}]"
                system = System(label + (RAG_SUFFIX if rag else "") + (SELECT_SUFFIX if select else ""),
                                adapter=True, retrieval=rag, select=select)
                specs.append(SystemSpec(system, read_adapter_meta(adapter)["base_model"], adapter))
        else:
            system = System(name, adapter=False, retrieval=rag)
            specs.append(SystemSpec(system, base_model if model == "base" else model, None))
    return specs


def protocol_key(spec: SystemSpec, args: EvalArguments, settings: GenerationSettings,
                 selector: ResponseSelector | None = None) -> str:
    """What a cached result depends on (a selecting system's: the selector too); a different key discards the cache."""
    adapter = ""
    if spec.adapter:
        adapter = files_sha256(sorted(spec.adapter.glob("*.safetensors")))
    chooser = selector.manifest.get("encoder_adapter") if spec.system.select and selector is not None else None
    key = [spec.base_model, adapter, spec.system.retrieval, spec.system.select, args.limit, args.seed, args.k,
           settings.to_dict(), PROMPT_FORMAT_VERSION] + ([chooser] if chooser else [])
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SystemCache:
    """Per-system results on disk: perplexity once, replies one line per example, so a rerun resumes."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "protocol.key"
        if not key_file.exists() or key_file.read_text() != key:
            for stale in folder.glob("*.json*"):
                stale.unlink()
            key_file.write_text(key)

    def load_perplexity(self) -> dict | None:
        """The cached perplexity record, if any."""
        path = self.folder / "perplexity.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_perplexity(self, record: dict) -> None:
        """Store the perplexity record."""
        (self.folder / "perplexity.json").write_text(json.dumps(record))

    def replies(self) -> dict[int, dict]:
        """Cached generated replies by example index (a torn last line from a kill is ignored)."""
        path, done = self.folder / "replies.jsonl", {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[row["i"]] = row
        return done

    def add_reply(self, row: dict) -> None:
        """Append one generated reply."""
        with (self.folder / "replies.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def batched_replies(
    bot: EmpatheticChatbot,
    dialogues: Sequence[tuple[str, Sequence[Turn]]],
    system: System,
    settings: GenerationSettings,
    batch_size: int,
) -> Iterator[tuple[Reply, float]]:
    """Each (message, history)'s reply, decoded `batch_size` at a time, with its batch's wall time per reply."""
    for start in range(0, len(dialogues), batch_size):
        started = time.perf_counter()
        replies = bot.respond_batch(dialogues[start:start + batch_size], settings=settings, system=system)
        seconds = (time.perf_counter() - started) / len(replies)  # throughput, not the latency one user sees
        yield from ((reply, seconds) for reply in replies)


def score_system(
    spec: SystemSpec,
    bot: EmpatheticChatbot,
    examples: Sequence[Example],
    settings: GenerationSettings,
    cache: SystemCache,
    embedder,
    query_vectors: np.ndarray,
    gold_vectors: np.ndarray | None,
    batch_size: int,
) -> dict:
    """Perplexity of the gold replies, then (given gold vectors) generated replies and their quality metrics."""
    ppl = cache.load_perplexity()
    if ppl is None:
        contexts = example_contexts(examples, embedder, bot.retriever if spec.system.retrieval else None, bot.emotion,
                                    bot.k, query_vectors)
        encoded = [encode_example(bot.chat.tokenizer, ex.history, ex.reply, c.references, c.emotion)
                   for ex, c in zip(examples, contexts)]
        ppl = perplexity(bot.chat, encoded, [ex.reply for ex in examples], progress=True)
        cache.save_perplexity(ppl)
    scores = {"perplexity": ppl["perplexity"], "word_perplexity": ppl["word_perplexity"], "perplexity_detail": ppl}
    if gold_vectors is None:
        return scores
    done = cache.replies()
    pending = [i for i in range(len(examples)) if i not in done]
    dialogues = [(examples[i].history[-1].text, examples[i].history[:-1]) for i in pending]
    replies = batched_replies(bot, dialogues, spec.system, settings, batch_size)
    for i, (reply, seconds) in zip(pending, tqdm(replies, total=len(examples), initial=len(examples) - len(pending),
                                                 desc=f"replies {spec.system.name}")):
        done[i] = {"i": i, "reply": reply.text, "kind": reply.kind, "seconds": seconds,
                   "source": "retrieved" if reply.from_dataset else "generated",
                   "score": reply.candidates[reply.chosen].score if reply.candidates else None}
        cache.add_reply(done[i])
    rows = [done[i] for i in range(len(examples))]
    replies, golds = [r["reply"] for r in rows], [ex.reply for ex in examples]
    model_rows = [r for r in rows if r["kind"] == "model"]
    similarity = np.sum(embed(embedder, replies) * gold_vectors, axis=1) if replies else np.zeros(0)
    share = 100.0 / max(len(rows), 1)
    return {
        **scores,
        "bleu4": metrics.corpus_bleu(replies, golds),
        "avg_bleu": float(np.mean([metrics.corpus_bleu(replies, golds, n) for n in range(1, 5)])),
        "avg_sentence_bleu": metrics.average_sentence_bleu(replies, golds),
        "rouge_l": metrics.rouge_l(replies, golds),
        "distinct_1": metrics.distinct_n(replies, 1),
        "distinct_2": metrics.distinct_n(replies, 2),
        "mean_length": metrics.mean_length(replies),
        "semantic_similarity": float(similarity.mean()) if len(similarity) else 0.0,
        "repeat_3gram_pct": share * sum(metrics.repeats_ngram(r) for r in replies),
        "echo_pct": share * sum(metrics.is_echo(r, [t.text for t in ex.history]) for r, ex in zip(replies, examples)),
        "empty_pct": share * sum(not r.strip() for r in replies),
        "replaced_pct": share * (len(rows) - len(model_rows)),
        "retrieved_reply_pct": share * sum(r.get("source") == "retrieved" for r in rows),
        "seconds_per_reply": float(np.median([r["seconds"] for r in rows])) if rows else 0.0,
        "replies": len(rows),
    }


def emotion_accuracy(bot: EmpatheticChatbot, test_conversations: Sequence[Conversation]) -> dict:
    """Detected vs gold emotion on every labelled test conversation: first speaker turn, and the whole dialogue."""
    conversations = [c for c in test_conversations if c.emotion]
    gold = [c.emotion for c in conversations]
    first = [p.label for p in bot.emotion.predict_many([c.turns[0].text for c in conversations])]
    whole = [p.label for p in bot.emotion.predict_many(["\n".join(t.text for t in c.turns) for c in conversations])]
    return {
        "conversations": len(conversations),
        "first_turn_accuracy": 100.0 * float(np.mean([p == g for p, g in zip(first, gold)])),
        "full_dialogue_accuracy": 100.0 * float(np.mean([p == g for p, g in zip(whole, gold)])),
    }


def retrieval_quality(
    retriever: Retriever, embedder, examples: Sequence[Example], query_vectors: np.ndarray,
    test_examples: Sequence[Example], seed: int, selector: ResponseSelector | None,
) -> dict:
    """Emotion agreement of retrieved dialogues, and P@1,N of the untuned MiniLM and of the shipped selector."""
    hits = retriever.search_vectors(query_vectors, 5)
    gold = [ex.emotion for ex in examples]
    labels = [[h.emotion for h in row] for row in hits]
    sets = candidate_sets(examples, sample(list(test_examples), CANDIDATE_POOL, seed + 1), CANDIDATES, seed)
    contexts = [query_text(ex.history) for ex in examples]
    scorers = {"": ResponseSelector(embedder)}
    if selector is not None:
        scorers["selector_"] = selector
    result = {
        "queries": len(examples),
        "top1_emotion_agreement": metrics.label_agreement(gold, labels, 1),
        "top5_emotion_agreement": metrics.label_agreement(gold, labels, 5),
        "candidates": min((len(row) for row in sets), default=0),
    }
    for prefix, scorer in scorers.items():
        scores = scorer.score_many(contexts, sets)
        result[f"{prefix}p_at_1"] = precision_at_1(scores)
        result[f"{prefix}p_at_1_10"] = precision_at_1(scores, 10)
    return result


def sample_text(reply: Reply) -> str:
    """A reply as samples.md shows it: a person's reply from the data set is named, not quoted (CC BY-NC)."""
    if reply.from_dataset:
        chosen = reply.candidates[reply.chosen]
        return f"*(a listener's reply from the data set, {chosen.conv_id}; not reproduced here: CC BY-NC)*"
    return reply.text


def sample_replies(
    bots: dict[str, tuple[SystemSpec, EmpatheticChatbot]], settings: GenerationSettings, count: int, batch_size: int
) -> list[dict]:
    """Every system's reply to each of the first `count` fixed prompts."""
    dialogues = [(turns[-1], [Turn(SPEAKER if i % 2 == 0 else LISTENER, t) for i, t in enumerate(turns[:-1])])
                 for turns in SAMPLE_PROMPTS[:count]]
    replies: dict[str, list[str]] = {}
    for label, (spec, bot) in tqdm(bots.items(), desc="samples"):
        replies[label] = [sample_text(reply) for reply, _ in
                          batched_replies(bot, dialogues, spec.system, settings, batch_size)]
    return [{"dialogue": turns, "replies": {label: texts[n] for label, texts in replies.items()}}
            for n, turns in enumerate(SAMPLE_PROMPTS[:count])]


def fmt(value: object, digits: int = 2) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """results.md: one table per metric family, our systems first, published anchors after them."""
    systems, proto, anchors = results["systems"], results["protocol"], results["anchors"]

    def table(columns: list[tuple[str, str]]) -> str:
        rows = [[label] + [m.get(key) for key, _ in columns] + ["ours"] for label, m in systems.items()]
        rows += [[a["system"]] + [a.get(key) for key, _ in columns] + [a["protocol"]] for a in anchors
                 if any(key in a for key, _ in columns)]
        return markdown_table(["system"] + [name for _, name in columns] + ["protocol"], rows)

    parts = [
        "# Evaluation results",
        f"Sample: {proto['sample']}. Generation: {proto['settings_name']} preset, the same for every system. "
        f"Retrieval (+rag): k={proto['k']} train-split dialogues. Run {results['date']} on {results['machine']}; "
        f"command: `{proto['command']}`.",
        "## Perplexity of the gold listener reply",
        proto["perplexity"],
        table([("perplexity", "PPL (model tokens)"), ("word_perplexity", "PPL (per word)")]),
    ]
    if not results["emotion"]:  # a --perplexity-only run
        return "\n\n".join(parts) + "\n"
    emotion, retrieval = results["emotion"], results["retrieval"]
    parts += [
        "## Generated replies",
        proto["generation"],
        table([("bleu4", "BLEU-4"), ("avg_bleu", "AVG BLEU 1-4"), ("avg_sentence_bleu", "sentence BLEU"),
               ("rouge_l", "ROUGE-L"), ("distinct_1", "Distinct-1"), ("distinct_2", "Distinct-2"),
               ("mean_length", "words"), ("semantic_similarity", "MiniLM cos"), ("bertscore", "BERTScore")]),
        "## Failure rates and speed",
        table([("echo_pct", "echo %"), ("repeat_3gram_pct", "repeats a 3-gram %"), ("empty_pct", "empty %"),
               ("replaced_pct", "replaced by the safety screen %"),
               ("retrieved_reply_pct", "shown reply is a person's, from the data set %"),
               ("seconds_per_reply", "s / reply (median)")]),
        "## Emotion detection and retrieval (once per run)",
        proto["emotion"],
        markdown_table(["measure", "ours", "anchor"], [
            ["emotion accuracy, first speaker turn", emotion["first_turn_accuracy"], "–"],
            ["emotion accuracy, full dialogue", emotion["full_dialogue_accuracy"], "MoEL 31.02 (own split, full context)"],
            ["retrieved top-1 emotion agreement", retrieval.get("top1_emotion_agreement"), "–"],
            ["retrieved top-5 emotion agreement", retrieval.get("top5_emotion_agreement"), "–"],
            [f"P@1,{retrieval.get('candidates', CANDIDATES)} (MiniLM bi-encoder)", retrieval.get("p_at_1"),
             "Rashkin et al. BERT 65.92"],
            ["P@1,10 (MiniLM bi-encoder)", retrieval.get("p_at_1_10"), "–"],
            [f"P@1,{retrieval.get('candidates', CANDIDATES)} (response selector)", retrieval.get("selector_p_at_1"),
             "Rashkin et al. BERT 65.92"],
            ["P@1,10 (response selector)", retrieval.get("selector_p_at_1_10"), "–"],
        ]),
        proto["retrieval"],
    ]
    return "\n\n".join(parts) + "\n"


def samples_markdown(rows: list[dict]) -> str:
    """samples.md: each fixed prompt with every system's reply."""
    parts = ["# Sample replies", "Fixed prompts (the original report's two messages first), greedy decoding."]
    for n, row in enumerate(rows, 1):
        dialogue = "\n".join(f"> **{'Speaker' if i % 2 == 0 else 'Listener'}:** {t}" for i, t in enumerate(row["dialogue"]))
        replies = "\n".join(f"- **{label}:** {text or '(empty)'}" for label, text in row["replies"].items())
        parts.append(f"## {n}\n\n{dialogue}\n\n{replies}")
    return "\n\n".join(parts) + "\n"


def plot_results(systems: dict[str, dict], out: Path, perplexity_only: bool = False) -> list[Path]:
    """Bar charts: perplexity per system, and (unless perplexity only) Distinct-2 / BLEU-4 / ROUGE-L per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(systems)
    paths = []
    charts = [("perplexity", ["perplexity", "word_perplexity"], "perplexity (lower is better)"),
              ("generation", ["distinct_2", "bleu4", "rouge_l"], "score x100")]
    for name, keys, ylabel in charts[:1] if perplexity_only else charts:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            values = [systems[label][key] for label in labels]
            bars = ax.bar(np.arange(len(labels)) + j * width, values, width, label=key.replace("_", " "))
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(np.arange(len(labels)) + width * (len(keys) - 1) / 2, labels)
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def versions() -> dict[str, str]:
    """Library versions that can change the numbers."""
    import importlib.metadata as md

    names = ["torch", "transformers", "peft", "sentence-transformers", "faiss-cpu", "sacrebleu", "rouge-score"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return dict(found, python=platform.python_version())


def main(argv: list[str] | None = None) -> int:
    """Score every requested system and write results.json, results.md, charts and samples.md."""
    (args,) = options.Parser(EvalArguments, description=__doc__.split("\n\n")[0]).parse(argv)
    missing = [name for name in EVAL_EXTRAS if importlib.util.find_spec(name) is None]
    if missing and not args.perplexity_only:  # found now, not after minutes of generation
        print(f"error: {', '.join(missing)} not installed: run `make eval` or "
              "`pip install -r requirements-eval.txt` (or pass --perplexity-only)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    started = time.perf_counter()
    settings = preset(args.preset)
    out = Path(args.out)
    try:
        adapters = [Path(a) for a in args.adapters] if args.adapters else [a for a in [default_adapter()] if a]
        specs = parse_systems(args.systems, adapters, args.base_model)
        # The test split is read once: the sample, the P@1,N distractors and emotion accuracy all come from it.
        conversations = load_conversations(args.data_dir, "test")
        test_examples = examples_of(conversations)
        examples = sample(test_examples, args.limit or None, args.seed)
        embedder = load_embedder(device=args.device)
        needs_index = any(s.system.retrieval for s in specs)
        retriever = Retriever(Path(args.index_dir) if args.index_dir else default_index_dir(), embedder) \
            if needs_index else None
        emotion = load_emotion_detector(embedder)
        selector = load_response_selector(embedder)
        if selector is None and any(s.system.select for s in specs):
            raise ModelLoadError("A +select system needs the response selector (assets/selector): "
                                 "train it with train_selector.py")
        models = {(s.base_model, s.adapter): load_chat_model(s.base_model, s.adapter, args.device) for s in specs}
    except (DataError, ModelLoadError, IndexLoadError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if emotion is None:
        print("error: the emotion classifier (assets/emotion) is missing", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    bots = {s.system.name: (s, EmpatheticChatbot(models[(s.base_model, s.adapter)], retriever, emotion, None, k=args.k,
                                           embedder=embedder, selector=selector)) for s in specs}
    # Embedded once: every system's emotion and neighbours, and the retrieval scores, use the same query vectors.
    query_vectors = embed(embedder, [query_text(ex.history) for ex in examples])
    gold_vectors = None if args.perplexity_only else embed(embedder, [ex.reply for ex in examples])
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    systems = {}
    for label, (spec, bot) in bots.items():
        cache = SystemCache(cache_dir / spec.slug, protocol_key(spec, args, settings, selector))
        systems[label] = score_system(spec, bot, examples, settings, cache, embedder, query_vectors, gold_vectors,
                                      args.batch_size)
        logger.info("%s: %s", label, {k: round(v, 2) for k, v in systems[label].items() if isinstance(v, float)})
    any_bot = next(iter(bots.values()))[1]
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {any_bot.chat.model.device}",
        "sample_size": len(examples),
        "protocol": {
            "command": "python eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "sample": f"{len(examples)} listener replies drawn at random (seed {args.seed}) from the official "
                      f"test split" + ("" if args.limit else " (all of them)"),
            "settings_name": args.preset,
            "settings": settings.to_dict(),
            "k": args.k,
            "perplexity": "NLL of the gold listener reply and its end-of-turn token given the dialogue history, in "
                          "the chatbot's prompt format (with the detected emotion; +rag: with the top-k train "
                          "dialogues). Token PPL = exp(NLL / model tokens); word PPL = exp(NLL / whitespace words of "
                          "the gold reply).",
            "generation": f"Replies from EmpatheticChatbot.respond_batch ({args.batch_size} test dialogues decoded "
                          "together, left-padded; crisis screen off, reply screen on; s/reply = a batch's wall time "
                          "divided by its size) against the "
                          "gold reply. BLEU: sacrebleu, 13a tokenization, one reference; AVG BLEU = mean of corpus "
                          "BLEU-1..4; sentence BLEU with exponential smoothing. ROUGE-L: rouge_score F1 with "
                          "stemming. Distinct-n, lengths, 3-gram repeats and echoes: lowercased regex words and "
                          "punctuation (chatbot/metrics.py), Distinct-n over all generated n-grams x100. Echo: the "
                          "reply's words appear in the dialogue as they are, or at least 80% of its word 3-grams do. "
                          "MiniLM cos: all-MiniLM-L6-v2 cosine between reply and gold. BERTScore: not computed "
                          "(needs a RoBERTa-large download).",
            "emotion": "Emotion detector (assets/emotion) on every labelled test conversation: its first speaker "
                       "turn, and the whole dialogue joined (MiniLM reads the first 128 tokens), against the "
                       "conversation's gold label (32 classes).",
            "retrieval": f"Retrieval over the train index for the sampled test histories (last {QUERY_TURNS} turns): share of "
                         "the top-1 / top-5 retrieved dialogues whose emotion label equals the gold one. P@1,N: "
                         "MiniLM cosine between the history and each candidate reply (response selector: its score, "
                         "assets/selector); candidates = the gold reply "
                         f"and N-1 replies drawn (seeded) from {CANDIDATE_POOL} other test-split replies of other "
                         "conversations; a hit when the gold scores strictly highest; P@1,10: the gold and the "
                         "first 9 of those.",
            "embedder": EMBEDDER_NAME,
            "prompt_format": PROMPT_FORMAT_VERSION,
            "adapters": {str(a): read_adapter_meta(a).get("metrics", {}).get("protocol") for a in adapters},
        },
        "versions": versions(),
        "systems": {label: {k: v for k, v in m.items() if k != "perplexity_detail"} for label, m in systems.items()},
        "perplexity_detail": {label: m["perplexity_detail"] for label, m in systems.items()},
        "emotion": {} if args.perplexity_only else emotion_accuracy(any_bot, conversations),
        "retrieval": retrieval_quality(retriever, embedder, examples, query_vectors, test_examples, args.seed,
                                        selector)
        if retriever and not args.perplexity_only else {},
        "anchors": ANCHORS,
    }
    if args.samples > 0 and not args.perplexity_only:
        (out / "samples.md").write_text(samples_markdown(sample_replies(bots, settings, args.samples, args.batch_size)))
    plot_results(results["systems"], out, perplexity_only=args.perplexity_only)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    print(results_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
