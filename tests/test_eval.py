"""eval.py end to end on the tiny random GPT-2 and the synthetic data: every output file, resume, bad input."""

from __future__ import annotations

import json

import pytest

import eval as evaluation
from chatbot.models import load_base_model, save_adapter


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    chat = load_base_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(chat.model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("adapter") / "lora-tiny"
    save_adapter(model, chat.tokenizer, out, str(tiny_model_dir), {"method": "lora"}, {"protocol": "none"})
    return out


def run_eval(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index, *extra):
    return evaluation.main([
        "--systems", "base", "base+rag", "tuned", "tuned+rag", "--adapters", str(tiny_adapter),
        "--base-model", str(tiny_model_dir), "--limit", "3", "--data-dir", str(synthetic_data),
        "--index-dir", str(synthetic_index), "--out", str(tmp_path / "results"), "--device", "cpu", "--samples", "2",
        *extra,
    ])


def test_three_examples_produce_every_output(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index):
    assert run_eval(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index) == 0
    out = tmp_path / "results"
    for name in ("results.json", "results.md", "samples.md", "perplexity.png", "generation.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["sample_size"] == 3
    assert set(results["systems"]) == {"base", "base+rag", "tuned", "tuned+rag"}
    for scores in results["systems"].values():
        assert scores["replies"] == 3 and scores["perplexity"] > 1
        assert {"bleu4", "rouge_l", "distinct_1", "distinct_2", "echo_pct", "semantic_similarity"} <= set(scores)
    assert 0 <= results["emotion"]["first_turn_accuracy"] <= 100
    assert results["retrieval"]["queries"] == 3 and results["retrieval"]["candidates"] > 1
    assert {"p_at_1_10", "selector_p_at_1", "selector_p_at_1_10"} <= set(results["retrieval"])  # shipped selector
    markdown = (out / "results.md").read_text()
    assert "Rashkin et al. 2019" in markdown and "MoEL" in markdown
    samples = (out / "samples.md").read_text()
    assert samples.count("**tuned+rag:**") == 2
    assert "I had such a hard day at work today." in samples

    # A second run resumes from the caches: no reply is generated again.
    cached = (out / "cache" / "tuned-lora-tiny+rag" / "replies.jsonl").read_text()
    assert run_eval(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index, "--samples", "0") == 0
    assert (out / "cache" / "tuned-lora-tiny+rag" / "replies.jsonl").read_text() == cached

    # A perplexity-only run elsewhere, sharing the caches, reports perplexity and nothing generated.
    other = tmp_path / "perplexity"
    assert run_eval(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index, "--perplexity-only",
                    "--out", str(other), "--cache-dir", str(out / "cache")) == 0
    only = json.loads((other / "results.json").read_text())
    assert only["systems"]["tuned+rag"]["perplexity"] == results["systems"]["tuned+rag"]["perplexity"]
    assert "bleu4" not in only["systems"]["base"] and not (other / "samples.md").exists()
    assert "Generated replies" not in (other / "results.md").read_text()


def test_a_selecting_system_ranks_its_candidates(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data,
                                                 synthetic_index):
    """eval.py's tuned+rag+select shows the selector's pick, not the first candidate unscored."""
    assert run_eval(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index, "--systems",
                    "tuned+rag+select", "--samples", "0") == 0
    rows = (tmp_path / "results" / "cache" / "tuned-lora-tiny+rag+select" / "replies.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(json.loads(row)["score"] is not None for row in rows)


@pytest.mark.parametrize("extra, code", [
    (["--adapters", "/no/such/adapter"], 2),
    (["--systems", "{tmp}/not-a-model"], 2),
    (["--data-dir", "/no/such/data"], 2),
])
def test_bad_inputs_exit_with_a_message(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index,
                                         capsys, extra, code):
    (tmp_path / "not-a-model").mkdir()
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    assert run_eval(tmp_path, tiny_model_dir, tiny_adapter, synthetic_data, synthetic_index, *extra) == code
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "results" / "results.json").exists()


@pytest.mark.parametrize("flags, message", [(["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch-size")])
def test_out_of_range_flags_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_evaluation_extras_are_reported_before_any_work(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else find_spec(name, *a))
    assert evaluation.main(["--data-dir", "/no/such/data", "--out", str(tmp_path / "results")]) == 2
    assert "sacrebleu not installed: run `make eval`" in capsys.readouterr().err


def test_samples_name_a_reply_from_the_data_set_without_quoting_it():
    """samples.md is committed: a person's reply the selector chose (CC BY-NC) is named by conversation, not quoted."""
    from chatbot.bot import Candidate, Reply

    generated = Candidate("I am so sorry to hear that.")
    person = Candidate("A person's words from the data set.", "retrieved", conv_id="hit:1_conv:2")
    assert evaluation.sample_text(Reply(text=generated.text, candidates=[generated, person], chosen=0)) == generated.text
    shown = evaluation.sample_text(Reply(text=person.text, candidates=[generated, person], chosen=1))
    assert person.text not in shown and "hit:1_conv:2" in shown


def test_a_selecting_systems_cache_follows_the_selector():
    """A retrained selector discards tuned+rag+select's cached replies; other systems' caches do not depend on it."""
    from types import SimpleNamespace

    from chatbot.generation import PRESETS

    args, settings = evaluation.EvalArguments(), PRESETS["greedy"]
    selectors = [SimpleNamespace(manifest={"encoder_adapter": {"sha256": digest}}) for digest in "ab"]

    def key(select: bool, selector) -> str:
        spec = SimpleNamespace(base_model="m", adapter=None, system=SimpleNamespace(retrieval=True, select=select))
        return evaluation.protocol_key(spec, args, settings, selector)

    assert key(True, selectors[0]) != key(True, selectors[1])
    assert key(False, selectors[0]) == key(False, selectors[1]) == key(False, None)
