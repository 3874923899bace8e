"""The builtin model's corpus ends no document where a reply starts (else its greedy replies come out empty), and
`model_types_informative` fails when the base model's own replies (y_init) are empty for most probe prompts."""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ldpipe.data.corpus import ends_at_reply_cue, from_dataset, prompt_before_reply_cue
from ldpipe.model.lm import EOS_TOKEN, _pack, train_tokenizer
from ldpipe.probes.checks import MOSTLY_EMPTY_SHARE, model_types_verdict
from ldpipe.runview import check_line
from ldpipe.spec import ExperimentSpec

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_base_probe_test.jsonl"


def _spec(**run) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "x", "dataset": {"kind": "local", "path": "d.jsonl"}, "probes": {"n_examples": 2, "selection": "first"},
        "runs": [{"name": "sft", **run}]})


def _transcripts() -> pl.DataFrame:
    """HH-style rows: single- and multi-turn transcript prompts (one in UltraFeedback's single-newline form) whose
    replies follow "Assistant:" after a space; r0-r3 train, r4-r5 test."""
    prompts = ["\n\nHuman: Where is Paris?\n\nAssistant:",
               "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:",
               "Human: What is two plus two?\nAssistant:",
               "\n\nHuman: Tell me a joke.\n\nAssistant: ",
               "\n\nHuman: How tall is a giraffe?\n\nAssistant:",
               "\n\nHuman: Spell cat.\n\nAssistant:"]
    rows = [(f"r{i}", "train" if i < 4 else "test", p, f" good answer {i}.", f" bad answer {i}.")
            for i, p in enumerate(prompts)]
    return pl.DataFrame(rows, schema=["example_id", "split", "prompt", "chosen", "rejected"], orient="row")


def test_reply_cue_is_found_and_cut_in_every_transcript_form():
    assert ends_at_reply_cue("\n\nHuman: a\n\nAssistant:") and ends_at_reply_cue("Human: a\nAssistant: ")
    assert not ends_at_reply_cue("\n\nHuman: a\n\nAssistant: b") and not ends_at_reply_cue("What is a?")
    assert prompt_before_reply_cue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == \
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
    assert prompt_before_reply_cue("Human: a\nAssistant:") == "Human: a"
    assert prompt_before_reply_cue("What is a?") == ""     # plain text: no cue to cut


def test_dataset_corpus_is_dialogues_and_no_document_ends_in_the_reply_cue_then_eos():
    prefs = _transcripts()
    # r0 and r1 trained on, r2 probed; r3 (train, past n_train), r4, r5 (test) held out, except " good answer 5."
    # (a probe text, e.g. drawn as y_test)
    probes = pl.DataFrame({"example_id": ["r2", "r2", "r1"], "response": [" good answer 2.", " good answer 5.",
                                                                          " good answer 1."]})
    c = from_dataset(_spec(n_train=2), prefs, probes)
    assert not [d for d in c.docs if ends_at_reply_cue(d)]
    # each held-out response follows its own prompt, as scoring joins them
    p = prefs["prompt"].to_list()
    assert sorted(d for d in c.docs if "answer" in d) == sorted([
        p[3] + " good answer 3.", p[3] + " bad answer 3.", p[4] + " good answer 4.", p[4] + " bad answer 4.",
        p[5] + " bad answer 5."])
    # trained and probed rows keep their prompt, cut before the reply cue; none of their answers is in
    assert {d for d in c.docs if "answer" not in d} == {
        "\n\nHuman: Where is Paris?", "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.",
        "Human: What is two plus two?"}
    assert c.counts == {"prompts": 6, "responses": 5, "dialogues": 5, "prompts_alone": 3, "prompts_left_out": 0,
                        "rows_trained_on": 2, "rows_probed": 1, "responses_in_probe_set": 1}
    # what pretraining reads: EOS after each document, never right after "Assistant:"
    tok = train_tokenizer(c.docs, vocab_size=300)
    rows = _pack(tok(c.docs, add_special_tokens=False)["input_ids"], tok.eos_token_id, 16)
    stream = tok.decode(rows.flatten().tolist(), skip_special_tokens=False)
    assert stream.count(EOS_TOKEN) >= 5 and "Assistant:" + EOS_TOKEN not in stream.replace(" " + EOS_TOKEN, EOS_TOKEN)


def test_plain_text_prompts_of_trained_rows_are_left_out():
    rows = [(f"q{i}", "train", f"What is {i}?", f" It is {i}.", f" Not {i}.") for i in range(4)]
    prefs = pl.DataFrame(rows, schema=["example_id", "split", "prompt", "chosen", "rejected"], orient="row")
    c = from_dataset(_spec(n_train=2), prefs, None)
    # q0, q1 trained: "What is 0?" then EOS would teach an empty reply, and there is no cue to cut
    assert sorted(c.docs) == ["What is 2? It is 2.", "What is 2? Not 2.", "What is 3? It is 3.", "What is 3? Not 3."]
    assert c.counts["prompts_left_out"] == 2 and "2 prompts without a reply cue to cut left out" in c.source


def test_synthetic_corpus_ends_every_dialogue_in_a_reply():
    from ldpipe.data.synthetic import SyntheticConfig, generate

    world = generate(SyntheticConfig(seed=1, n_entities=16, n_train=32, n_test=8, corpus_docs=200))
    assert any("\n\nAssistant: " in d for d in world.corpus)
    assert not [d for d in world.corpus if ends_at_reply_cue(d)]


# ------------------------------------------------------------------------------ model_types_informative

def _report(rows: int, **empty: int) -> dict:
    types = ("chosen", "chosen_initial", "chosen_selfr", "random_tokens")
    return {"length_words": {t: {"mean": 5.0, "min": 0, "max": 9, "rows": rows} for t in types},
            "empty_by_type": {t: n for t, n in empty.items() if n}, "selfr_identical_to_chosen": 0}


MODEL_TYPES = ["chosen_initial", "chosen_selfr", "random_tokens"]


def test_informative_check_fails_when_y_init_is_empty_for_most_prompts():
    passed, line, meta = model_types_verdict(_report(24, chosen_initial=24), MODEL_TYPES)
    assert not passed and line == "y_init empty for 24 of 24 prompts: the base model ends its reply at once"
    assert meta["mostly_empty"] == ["chosen_initial"] and MOSTLY_EMPTY_SHARE == 0.5
    passed, line, _ = model_types_verdict(_report(24, chosen_initial=13), MODEL_TYPES)   # more than half
    assert not passed and line.startswith("y_init empty for 13 of 24 prompts")
    passed, line, _ = model_types_verdict(_report(24, chosen_initial=20, chosen_selfr=24), MODEL_TYPES)
    assert not passed and line == ("y_init empty for 20 of 24 prompts: the base model ends its reply at once; "
                                   "y_selfr empty for 24 of 24 prompts: the base model ends its rephrase at once")
    # an empty type the model stage did not make (y_init read from the dataset) is not its concern
    assert model_types_verdict(_report(24, chosen_initial=24), ["random_tokens"])[0]


def test_informative_check_passes_when_most_replies_are_non_empty():
    passed, line, meta = model_types_verdict(_report(24), MODEL_TYPES)
    assert passed and line == "no empty model-made response" and meta["mostly_empty"] == []
    passed, line, _ = model_types_verdict(_report(24, chosen_initial=12), MODEL_TYPES)    # half: not most
    assert passed and line == "y_init empty for 12 of 24 prompts (at most 50% may be)"
    report = {**_report(24), "selfr_identical_to_chosen": 2}   # a copy of y+ is no rephrase
    assert model_types_verdict(report, MODEL_TYPES)[:2] == (False, "y_selfr copies y+ verbatim for 2 of 24 prompts")


@dg.asset(check_specs=[dg.AssetCheckSpec("model_types_informative", asset="probes")])
def probes():
    passed, line, meta = model_types_verdict(_report(24, chosen_initial=24), MODEL_TYPES)
    yield dg.MaterializeResult()
    yield dg.AssetCheckResult(check_name="model_types_informative", passed=passed, description=line,
                              severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"empty_by_type": dg.MetadataValue.json(meta["empty_by_type"])})


def test_the_run_summary_says_it_in_one_line():
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([probes], instance=instance, raise_on_error=False)
    (ev,) = result.get_asset_check_evaluations()
    assert check_line(ev) == ("FAIL probes:model_types_informative  y_init empty for 24 of 24 prompts: the base "
                              'model ends its reply at once  (empty_by_type={"chosen_initial":24})')


# ------------------------------------------------------------------------------ on real text

@pytest.mark.skipif(not HH.is_file(), reason="the shared HH probe file is not present")
def test_builtin_model_on_hh_text_gives_non_empty_greedy_replies(tmp_path, monkeypatch):
    """On 24 Anthropic-HH probe prompts a small builtin model (pretrained ~10 s) replies: measured 24 of 24 empty
    when its corpus held the bare prompts, 0 of 24 with whole dialogues."""
    from ldpipe import pipeline
    from ldpipe.paths import Paths
    from ldpipe.spec import parse_experiment

    monkeypatch.setenv("LDPIPE_THREADS", "1")
    spec = parse_experiment({
        "name": "hh", "dataset": {"kind": "local", "path": str(HH)},
        "probes": {"n_examples": 24, "selection": "first", "types": ["chosen", "rejected", "chosen_initial"]},
        "model": {"kind": "builtin", "vocab_size": 1024,
                  "architecture": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 256},
                  "pretrain": {"steps": 150, "batch_size": 8, "seq_len": 128, "warmup": 10}},
        "runs": [{"name": "sft", "algo": "sft", "n_train": 100}]}, source="test")
    files = pipeline.files_for(spec, Paths(tmp_path / "home"))
    quiet = lambda _m: None  # noqa: E731
    pipeline.build_dataset(spec, files, log=quiet)
    pipeline.build_probes(spec, files, log=quiet)
    base = pipeline.build_base_model(spec, files, device="cpu", log=quiet)
    assert base.record["corpus_rule"] == 2 and base.record["corpus_dialogues"] == 799
    assert base.record["corpus_rows_trained_on"] == 100
    info = pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    replies = pl.read_parquet(files.model_probes).filter(pl.col("response_type") == "chosen_initial")["response"]
    empty = sum(not r.strip() for r in replies)
    assert len(replies) == 24 and empty <= len(replies) // 2, f"{empty} of {len(replies)} greedy replies empty"
    passed, line, _ = model_types_verdict(info.checks, info.types)
    assert passed, line
