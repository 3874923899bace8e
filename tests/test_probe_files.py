"""Probe sets from real files: word checks that ignore how a file spaces its words, "first N" in file order,
truncation counted per response type, and analyses that say when the dataset has no held-out split.

One small project holds a local preference file (ids "0".."23" as strings, no split column: no test split) with a
small untrained checkpoint as its model, and a reference-format probe file whose shuffles, like the reference's
own, are joined with single spaces while y+ has double spaces and line breaks. One in-process materialization
builds what the tests read."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from conftest import REPO

from ldpipe import pipeline
from ldpipe.paths import Paths, project_dir
from ldpipe.probes.checks import check_probe_set
from ldpipe.spec import load_experiments, parse_experiment

N_ROWS = 24
WORDS = ("river stone lamp garden window copper violet morning harbor quiet paper candle orchard silver "
         "meadow bridge lantern pepper thunder maple").split()
MAX_PROMPT, MAX_RESPONSE = 64, 48
LOCAL_YAML = f"""
name: local
dataset: {{kind: local, path: pairs.jsonl}}
probes: {{n_examples: 4, selection: first, seed: 0, max_prompt_tokens: {MAX_PROMPT},
          max_response_tokens: {MAX_RESPONSE}, generation: {{max_new_tokens: 6}}}}
model: {{kind: pretrained, name_or_path: ./ckpt}}
runs:
  - {{name: sft, algo: sft, epochs: 1, batch_size: 4, lr: 1.0e-3, eval_every: 2, n_train: 12}}
generation_analysis: {{n_prompts: 2, max_new_tokens: 4}}
"""
REF_YAML = """
name: ref
dataset: {kind: reference_probes, path: ref.jsonl}
probes: {n_examples: 6, selection: first, seed: 0}
model: {kind: pretrained, name_or_path: ./ckpt}
runs:
  - {name: sft, algo: sft, epochs: 1, batch_size: 4, lr: 1.0e-3, eval_every: 2}
"""
REF_KEYS = ("chosen", "rejected", "chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat",
            "irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum", "chosen_initial", "chosen_selfr")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _pairs() -> list[dict]:
    """Even rows have long prompts (cut at MAX_PROMPT tokens), rows 0-2 long answers (cut at MAX_RESPONSE)."""
    rng = random.Random(7)
    return [{"example_id": str(i),
             "prompt": f"\n\nHuman: {_text(rng, 40 if i % 2 == 0 else 4)}?\n\nAssistant:",
             "chosen": " " + _text(rng, 60 if i < 3 else 6), "rejected": " " + _text(rng, 5)}
            for i in range(N_ROWS)]


def _shuffle(text: str, rng: random.Random) -> str:
    """A word shuffle as the reference made them: split on any whitespace, joined with single spaces."""
    words = text.split()
    out = list(words)
    while out == words:
        rng.shuffle(out)
    return " " + " ".join(out)


def _ref_rows() -> list[dict]:
    rng = random.Random(3)
    rows = []
    for i in range(8):
        chosen = f" {_text(rng, 5)}.  {_text(rng, 6)}\n\n{_text(rng, 4)}  {_text(rng, 3)}"   # double spaces, breaks
        irr_test = f" {_text(rng, 4)}.  {_text(rng, 5)}"
        row = {k: " " + _text(rng, 6) for k in REF_KEYS}
        row |= {"prompt": f"\n\nHuman: {_text(rng, 5)}?\n\nAssistant:", "chosen": chosen, "irr_test": irr_test,
                "random_permute": _shuffle(chosen, rng), "random_nonhum": _shuffle(irr_test, rng)}
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _checkpoint(path: Path, texts: list[str]) -> None:
    """A small untrained GPT-NeoX with a BPE tokenizer of the data's words (a local `pretrained` model)."""
    from ldpipe.model.checkpoints import save_checkpoint
    from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                        max_position_embeddings=256), vocab_size=len(tok))
    save_checkpoint(model, tok, path)


LOCAL_KEYS = ("dataset", "probe_set", "base_model", "model_probes", "run_sft", "squeezing", "borrowing")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from ldpipe.defs.experiments import build_defs
    from ldpipe.defs.resources import Compute, LdpipeHome

    proj = tmp_path_factory.mktemp("probe_files") / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "sql").symlink_to(REPO / "sql")
    pairs, ref = _pairs(), _ref_rows()
    _write_jsonl(proj / "pairs.jsonl", pairs)
    _write_jsonl(proj / "ref.jsonl", ref)
    _checkpoint(proj / "ckpt", [t for r in pairs for t in r.values()] + [t for r in ref for t in r.values()])
    (proj / "assets" / "local.yaml").write_text(LOCAL_YAML)
    (proj / "assets" / "ref.yaml").write_text(REF_YAML)
    mp = pytest.MonkeyPatch()
    mp.setenv("LDPIPE_PROJECT_DIR", str(proj))
    mp.setenv("LDPIPE_HOME", str(proj / ".ldpipe"))
    mp.setenv("LDPIPE_THREADS", "1")
    mp.delenv("LDPIPE_ASSETS_DIR", raising=False)
    try:
        defs = build_defs(load_experiments(proj / "assets"))
        keys = [dg.AssetKey(["local", k]) for k in LOCAL_KEYS] + [dg.AssetKey("catalog")] + [
            dg.AssetKey(["ref", k]) for k in ("dataset", "probe_set")]
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize(list(defs.assets), selection=keys, instance=instance,
                                resources={"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")})
        assert result.success
        yield proj, result, instance
    finally:
        mp.undo()


def _materialization(result, key: str):
    return next(m.materialization for m in result.get_asset_materialization_events()
                if m.asset_key.to_user_string() == key)


def _warnings(instance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]


def _spec(name: str):
    return next(s for s in load_experiments(project_dir() / "assets") if s.name == name)


# ----------------------------------------------------------------------------- words split on any whitespace

def test_reference_shuffles_with_double_spaces_pass_perturbations_valid(project):
    _proj, result, _instance = project
    checks = {(c.asset_key.to_user_string(), c.check_name): c for c in result.get_asset_check_evaluations()}
    valid = checks[("ref/probe_set", "perturbations_valid")]
    # y+ has double spaces and line breaks, its shuffle single spaces: the same words all the same
    assert valid.passed and valid.metadata["shuffle_failures"].value == 0
    meta = _materialization(result, "ref/probe_set").metadata
    probes = pl.read_parquet(pipeline.files_for(_spec("ref")).probes)
    chosen = probes.filter(pl.col("response_type") == "chosen")["response"].to_list()
    assert any("  " in y and "\n" in y for y in chosen)
    words = [len(y.split()) for y in chosen]
    assert meta["length_stats"].value["chosen"] == {"mean": round(sum(words) / len(words), 2), "min": min(words),
                                                   "max": max(words), "rows": len(words)}


def test_word_counts_and_permutation_check_ignore_spacing():
    from ldpipe.probes.build import split_words

    assert split_words(" one  two\n\nthree ") == ["one", "two", "three"]
    probes = pl.DataFrame({"example_id": ["a", "a"], "response_type": ["chosen", "random_permute"],
                           "prompt": ["p", "p"], "response": [" one  two\n\nthree", " three one two"],
                           "provenance": ["x", "x"]})
    report = check_probe_set(probes, ["chosen", "random_permute"])
    assert report["shuffle_failures"] == 0 and report["shuffle_checked"] == 1
    assert report["length_words"]["chosen"] == {"mean": 3.0, "min": 3, "max": 3, "rows": 1}
    from ldpipe.probes.llm_types import llm_prompt

    assert llm_prompt("random_sentence", " one  two  three\n") == "Please generate a random sentence with 3 words."


# ----------------------------------------------------------------------------- "first N" is file order

def test_training_rows_and_probe_prompts_follow_file_order(project):
    from ldpipe.influence.inputs import training_units

    spec = _spec("local")
    files = pipeline.files_for(spec)
    prefs = pipeline.load_preferences_file(files)
    assert prefs["example_id"].to_list() == [str(i) for i in range(N_ROWS)]      # the stored frame keeps file order
    run = spec.runs[0]
    first12 = [str(i) for i in range(12)]      # in string order the first 12 would be 0, 1, 10-19, 2, 20
    assert [u.example_id for u in training_units(spec, run, files)] == first12
    assert pipeline.training_rows(prefs, run)["example_id"].to_list() == first12    # what train_run trains on
    assert sorted(pl.read_parquet(files.probes)["example_id"].unique().to_list()) == ["0", "1", "2", "3"]
    # selection: random samples positions in the file, not in id order
    data = yaml.safe_load(LOCAL_YAML)
    data["name"] = "local_random"
    data["probes"] |= {"selection": "random", "n_examples": 5}
    rspec = parse_experiment(data, source="test")
    rfiles = pipeline.files_for(rspec)
    pipeline.build_dataset(rspec, rfiles, log=lambda m: None)
    pipeline.build_probes(rspec, rfiles, log=lambda m: None)
    want = {str(i) for i in random.Random("0:selection").sample(range(N_ROWS), 5)}
    assert set(pl.read_parquet(rfiles.probes)["example_id"].to_list()) == want


def test_generation_prompts_take_the_first_rows_of_the_file():
    from ldpipe.analysis.squeezing import generation_prompts

    ids = ["9", "10", "11", "2"]
    prefs = pl.DataFrame({"example_id": ids, "split": ["train", "train", "test", "test"],
                          "prompt": [f"p{i}" for i in ids], "chosen": [f"c{i}" for i in ids],
                          "rejected": [""] * 4, "source": ["s"] * 4})
    probes = pl.DataFrame({"example_id": ["9", "10"], "response_type": ["chosen"] * 2, "prompt": ["p9", "p10"],
                           "response": ["c9", "c10"], "provenance": ["d"] * 2})
    assert generation_prompts(prefs, probes, 1)["example_id"].to_list() == ["9", "11"]


# ----------------------------------------------------------------------------- truncation per response type

def test_truncation_counted_per_type_in_metadata_store_and_warnings(project):
    from ldpipe.model.checkpoints import load_tokenizer
    from ldpipe.store.catalog import query

    proj, result, instance = project
    spec = _spec("local")
    files = pipeline.files_for(spec)
    tok = load_tokenizer(proj / "ckpt")
    probes = pipeline.load_probes_file(files)
    want = {}
    for t, part in probes.group_by("response_type"):
        n_p = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in part["prompt"]]
        n_r = [len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in part["response"]]   # + EOS
        want[t[0]] = {"rows": part.height, "max_prompt_tokens": MAX_PROMPT, "max_response_tokens": MAX_RESPONSE,
                      "prompts_cut": sum(n > MAX_PROMPT for n in n_p),
                      "prompt_tokens_dropped": sum(max(0, n - MAX_PROMPT) for n in n_p),
                      "responses_cut": sum(n > MAX_RESPONSE for n in n_r),
                      "response_tokens_dropped": sum(max(0, n - MAX_RESPONSE) for n in n_r)}
    assert want["chosen"]["prompts_cut"] == 2 and want["chosen"]["responses_cut"] == 3    # as the data was made
    assert want["rejected"]["responses_cut"] == 0
    meta = _materialization(result, "local/model_probes").metadata
    assert meta["truncation"].value == want
    table = query(Paths.default().catalog, "select * from probe_truncation where experiment = 'local'")
    assert {r.pop("response_type"): {k: v for k, v in r.items() if k != "experiment"}
            for r in table.iter_rows(named=True)} == want
    warned = _warnings(instance, result)
    assert meta["truncation_warnings"].value and set(meta["truncation_warnings"].value) <= set(warned)
    prompt_lines = [w for w in warned if "'chosen':" in w and "prompts" in w]
    assert prompt_lines and "2 of 4 prompts (50%)" in prompt_lines[0] and "probes.max_prompt_tokens" in prompt_lines[0]
    resp_lines = [w for w in warned if "'chosen':" in w and "responses" in w]
    assert resp_lines and "3 of 4 responses (75%)" in resp_lines[0] and "probes.max_response_tokens" in resp_lines[0]
    assert not [w for w in warned if "'rejected':" in w and "responses" in w]    # none of its responses is cut


# ----------------------------------------------------------------------------- no held-out split

NOTE = "no held-out (test) split in dataset local/dataset (local: pairs.jsonl): "


def test_analyses_say_there_is_no_held_out_split(project):
    from ldpipe.analysis.winrate import run_win_rate
    from ldpipe.store.catalog import query
    from ldpipe.store.shards import Store

    _proj, result, instance = project
    borrowing = _materialization(result, "local/borrowing").metadata["held_out"].value
    assert borrowing == NOTE + "held-out borrowing skipped (only the trained probe prompts are scored)"
    squeezing = _materialization(result, "local/squeezing").metadata["held_out"].value
    assert squeezing.startswith(NOTE + "held-out generations skipped")
    warned = _warnings(instance, result)
    assert borrowing in warned and squeezing in warned
    rows = query(Paths.default().catalog, "select split from generation_borrowing where run_id = 'local.sft'")
    assert rows.height > 0 and set(rows["split"]) == {"train"}
    # the win rate judges held-out prompts only: it says why it is skipped before any model or judge is used
    data = yaml.safe_load(LOCAL_YAML)
    data["generation_analysis"]["win_rate"] = {"judge": {"model": "j", "base_url": "http://127.0.0.1:9/v1",
                                                         "api_key_env": "LDPIPE_TEST_NO_KEY"},
                                               "pairs": [["sft", "sft@start"]]}
    spec = parse_experiment(data, source="test")
    info = run_win_rate(spec, pipeline.files_for(spec), Store(Paths.default().store))
    assert info == {"skipped": NOTE + "win rate skipped (it judges held-out prompts)"}
