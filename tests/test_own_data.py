"""Your own data, as a newcomer runs it: a fresh directory holding a small JSONL and a YAML with a builtin model
(no sql/, no dagster.yaml), `ldpipe check`, then `ldpipe run -e NAME --preset smoke`; and the same with the
reference-format HH probe file when it is present."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from ldpipe.data.corpus import from_dataset, read_corpus_file
from ldpipe.errors import DataValidationError
from ldpipe.spec import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]
LDPIPE = str(Path(sys.executable).parent / "ldpipe")
EXAMPLE = REPO / "examples" / "own_data"
HH = REPO.parent / "shared" / "data" / "hh_helpful_base_probe_test.jsonl"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "LDPIPE_THREADS": "1", **extra})
    return env


def _fresh_project(tmp_path: Path) -> Path:
    proj = tmp_path / "mine"
    (proj / "assets").mkdir(parents=True)
    shutil.copy(EXAMPLE / "qa.jsonl", proj / "qa.jsonl")
    shutil.copy(EXAMPLE / "assets" / "own_qa.yaml", proj / "assets" / "own_qa.yaml")
    return proj


# ------------------------------------------------------------------------------------------- the corpus

def _spec(**runs) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "x", "dataset": {"kind": "local", "path": "d.jsonl"}, "probes": {"n_examples": 2, "selection": "first"},
        "runs": [{"name": "sft", **runs}]})


def _prefs() -> pl.DataFrame:
    rows = [(f"r{i}", "train" if i < 6 else "test", f"\n\nHuman: prompt {i}\n\nAssistant:", f" good {i}", f" bad {i}")
            for i in range(8)]
    return pl.DataFrame(rows, schema=["example_id", "split", "prompt", "chosen", "rejected"], orient="row")


def _answers(docs: list[str]) -> list[str]:
    """The responses of the corpus's dialogues (the text after their last "Assistant:")."""
    return sorted(d.rsplit("Assistant:", 1)[1] for d in docs if "Assistant:" in d)


def test_corpus_leaves_out_trained_and_probed_answers_and_keeps_every_prompt():
    prefs = _prefs()
    probes = pl.DataFrame({"example_id": ["r0", "r0", "r1"], "response": [" good 0", " good 7", " good 1"]})
    c = from_dataset(_spec(n_train=4), prefs, probes)
    # every row's prompt is in: whole in a dialogue, or cut before its reply cue (tests/test_builtin_corpus.py)
    assert all(any(f"Human: prompt {i}" in d for d in c.docs) for i in range(8)) and c.counts["prompts"] == 8
    assert [d for d in c.docs if "good" not in d and "bad" not in d] == [f"\n\nHuman: prompt {i}" for i in range(4)]
    # r0-r3 trained on (the first 4 train rows in file order); r4, r5 (train, not trained) and r6, r7 (test) kept,
    # except " good 7": a probe text (a test answer drawn as y_test)
    assert _answers(c.docs) == sorted([" good 4", " bad 4", " good 5", " bad 5", " good 6", " bad 6", " bad 7"])
    assert "\n\nHuman: prompt 4\n\nAssistant: good 4" in c.docs
    assert c.counts["rows_trained_on"] == 4 and c.counts["responses_in_probe_set"] == 1
    # a run without n_train trains on the whole train split: only test answers remain
    c = from_dataset(_spec(), prefs, probes)
    assert _answers(c.docs) == [" bad 6", " bad 7", " good 6"]
    # file order, not id order: with ids that sort differently the first rows of the file are the trained ones
    shuffled = prefs.with_columns(pl.Series("example_id", ["r9", "r10", "r2", "r1", "r0", "r11", "t1", "t2"]))
    c = from_dataset(_spec(n_train=2), shuffled, None)
    assert " good 0" not in _answers(c.docs) and " good 1" not in _answers(c.docs) and " good 2" in _answers(c.docs)


def test_corpus_file_reads_txt_and_jsonl_and_names_the_bad_line(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\nstill first\n\nsecond doc\n\n\n")
    assert read_corpus_file(txt) == ["first doc\nstill first", "second doc"]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    with pytest.raises(DataValidationError, match=r"c.jsonl, row 3, field 'text'"):
        read_corpus_file(jl)
    with pytest.raises(DataValidationError, match="does not exist"):
        read_corpus_file(tmp_path / "nope.txt")


def test_an_undeclared_corpus_keeps_every_config_hash():
    """`model.corpus` is new: leaving it out must not change the hashes that name base models and runs."""
    spec = _spec()
    assert "corpus" not in spec.model.model_dump(mode="json")
    with_corpus = ExperimentSpec.model_validate({**spec.model_dump(mode="json"),
                                                 "model": {**spec.model.model_dump(mode="json"), "corpus": "c.txt"}})
    assert with_corpus.model_config_hash() != spec.model_config_hash()
    assert with_corpus.run_config_hash(with_corpus.runs[0]) != spec.run_config_hash(spec.runs[0])


# ------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_own_jsonl_with_builtin_model_checks_and_runs_from_a_fresh_directory(tmp_path):
    proj = _fresh_project(tmp_path)
    chk = subprocess.run([LDPIPE, "check"], capture_output=True, text=True, cwd=proj, env=_env(), timeout=120)
    assert chk.returncode == 0, chk.stderr
    assert "20 rows parse, every row checked" in chk.stdout and "1 experiment(s) OK" in chk.stdout
    r = subprocess.run([LDPIPE, "run", "-e", "own_qa", "--preset", "smoke", "--device", "cpu"], capture_output=True,
                       text=True, cwd=proj, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    home = proj / ".ldpipe"
    # every asset of the experiment finished, one line each; nothing of Dagster's log on the terminal
    for asset in ("dataset", "probe_set", "base_model", "model_probes", "run_sft", "run_dpo", "learning_curves",
                  "squeezing", "borrowing", "influence_matrix", "paper_directions"):
        assert f"done  own_qa/{asset}" in r.stdout, asset
    assert "DEBUG" not in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    assert "Warning" not in r.stdout + r.stderr      # library warnings went to the log file
    logs = list((home / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "DEBUG" in logs[0].read_text() and "STEP_SUCCESS" in logs[0].read_text()
    # the base model was pretrained on the data's own untrained rows, and says so
    meta = json.loads(next((home / "models").glob("base-*/ldpipe.json")).read_text())
    assert meta["corpus_source"].startswith("dataset local: ") and meta["corpus_tokens"] > 0
    assert meta["corpus_rule"] == 2 and meta["corpus_dialogues"] > 0
    # the catalog (built-in views, though the project has no sql/) holds both runs
    con = duckdb.connect(str(home / "catalog.duckdb"), read_only=True)
    runs = {r for (r,) in con.sql("select distinct run_id from learning_curves").fetchall()}
    assert runs == {"own_qa.sft", "own_qa.dpo"}
    con.close()
    # the "Next" commands run as printed from a shell without the venv on PATH
    nxt = r.stdout.split("Next (from any shell):\n", 1)[1].splitlines()
    sql_line = next(line.strip() for line in nxt if " sql " in line)
    q = subprocess.run(["bash", "-c", sql_line], capture_output=True, text=True, cwd=proj, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert q.returncode == 0, q.stderr
    # each run's own last step: the smoke SFT takes 2 steps and the DPO 4, so a global max(step) would drop the SFT
    last = {line.split()[1]: int(line.split()[5]) for line in q.stdout.splitlines() if "own_qa." in line}
    assert last == {"own_qa.sft": 2, "own_qa.dpo": 4}, q.stdout


@pytest.mark.slow
def test_bad_row_fails_check_and_run_with_file_row_and_field_on_the_last_line(tmp_path):
    proj = _fresh_project(tmp_path)
    rows = [json.loads(x) for x in (proj / "qa.jsonl").read_text().splitlines()]
    rows[2]["good"] = 42
    (proj / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    want = "qa.jsonl, row 3, field 'good': expected a string, got a JSON number (42)"
    chk = subprocess.run([LDPIPE, "check", "-e", "own_qa"], capture_output=True, text=True, cwd=proj, env=_env(),
                         timeout=120)
    assert chk.returncode == 2 and want in chk.stderr.strip().splitlines()[-1], chk.stderr
    r = subprocess.run([LDPIPE, "run", "--device", "cpu"], capture_output=True, text=True, cwd=proj, env=_env(),
                       timeout=300)
    assert r.returncode == 1
    assert want in r.stderr.strip().splitlines()[-1], r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "Full event log: " in r.stderr
    assert "downstream of a failure" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HH.is_file(), reason="the shared HH probe file is not present")
def test_reference_hh_probe_file_with_builtin_model(tmp_path):
    proj = tmp_path / "hh"
    (proj / "assets").mkdir(parents=True)
    (proj / "assets" / "hh.yaml").write_text(f"""
name: hh
dataset: {{kind: reference_probes, path: {HH}}}
probes: {{n_examples: 6, selection: first}}
model:
  kind: builtin
  vocab_size: 1024
  architecture: {{hidden_size: 64, num_layers: 2, num_heads: 2, intermediate_size: 256}}
  pretrain: {{steps: 20, batch_size: 8, seq_len: 64, warmup: 2}}
runs:
  - {{name: sft, algo: sft, n_train: 100, epochs: 1, batch_size: 4}}
  - {{name: dpo, algo: dpo, start_from: sft, n_train: 100, epochs: 1, batch_size: 4}}
generation_analysis: {{n_prompts: 2, max_new_tokens: 8}}
influence: {{enabled: false}}
""")
    chk = subprocess.run([LDPIPE, "check"], capture_output=True, text=True, cwd=proj, env=_env(), timeout=120)
    assert chk.returncode == 0 and "500 rows parse" in chk.stdout, chk.stdout + chk.stderr
    r = subprocess.run([LDPIPE, "run", "-e", "hh", "--preset", "smoke", "--device", "cpu"], capture_output=True,
                       text=True, cwd=proj, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for asset in ("dataset", "probe_set", "base_model", "model_probes", "run_sft", "run_dpo", "learning_curves"):
        assert f"done  hh/{asset}" in r.stdout, asset
    meta = json.loads(next((proj / ".ldpipe" / "models").glob("base-*/ldpipe.json")).read_text())
    # the smoke runs train on the first 16 rows, the declaration on the first 100: those and the probed rows
    # are out of the corpus
    assert meta["corpus_rows_trained_on"] == 100 and meta["corpus_responses"] > 0
