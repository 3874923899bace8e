"""`ldpipe check` catches, without training, what a run would hit: each case here passed `check` before and then
failed at run time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ldpipe.preflight import check_experiment
from ldpipe.spec import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]
LDPIPE = str(Path(sys.executable).parent / "ldpipe")
ROWS = [{"id": f"q{i}", "question": f"Question number {i}?", "good": f"A good answer {i}.",
         "bad": f"A bad answer {i}.", "split": "test" if i >= 8 else "train"} for i in range(10)]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _spec(proj: Path, monkeypatch, **over) -> ExperimentSpec:
    monkeypatch.setenv("LDPIPE_PROJECT_DIR", str(proj))
    body = {"name": "mine", "dataset": {"kind": "local", "path": "d.jsonl",
                                        "columns": {"example_id": "id", "prompt": "question", "chosen": "good",
                                                    "rejected": "bad"}},
            "probes": {"n_examples": 4, "selection": "first"},
            "runs": [{"name": "sft", "algo": "sft", "batch_size": 4}]}
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    return ExperimentSpec.model_validate(body)


def test_good_data_is_ok_and_counts_the_run_steps(tmp_path, monkeypatch):
    _write(tmp_path / "d.jsonl", ROWS)
    rep = check_experiment(_spec(tmp_path, monkeypatch))
    assert rep.errors == [], rep.errors
    assert any("10 rows parse, every row checked" in x for x in rep.lines)
    assert any(x.startswith("run sft (sft): 8 training examples -> 6 optimizer steps") for x in rep.lines)


def test_missing_data_file(tmp_path, monkeypatch):
    rep = check_experiment(_spec(tmp_path, monkeypatch))
    assert rep.errors == [f"dataset.path 'd.jsonl': {tmp_path / 'd.jsonl'} does not exist"]


def test_empty_prompt_names_file_row_and_field(tmp_path, monkeypatch):
    rows = [dict(r) for r in ROWS]
    rows[4]["question"] = "  "
    _write(tmp_path / "d.jsonl", rows)
    rep = check_experiment(_spec(tmp_path, monkeypatch))
    assert len(rep.errors) == 1 and "d.jsonl, row 5, field 'prompt'" in rep.errors[0]


def test_missing_or_empty_model_directory(tmp_path, monkeypatch):
    _write(tmp_path / "d.jsonl", ROWS)
    spec = _spec(tmp_path, monkeypatch, model={"kind": "pretrained", "name_or_path": "./models/mine"})
    rep = check_experiment(spec)
    assert len(rep.errors) == 1 and "model.name_or_path './models/mine'" in rep.errors[0]
    (tmp_path / "models" / "mine").mkdir(parents=True)
    rep = check_experiment(spec)
    assert len(rep.errors) == 1 and "holds no config.json" in rep.errors[0]


def test_zero_step_run_and_unsuppliable_probe_types(tmp_path, monkeypatch):
    _write(tmp_path / "d.jsonl", [{**r, "split": "test"} for r in ROWS])   # no train split at all
    rep = check_experiment(_spec(tmp_path, monkeypatch))
    assert any("run 'sft': no training rows" in e and "zero steps" in e for e in rep.errors), rep.errors
    _write(tmp_path / "d.jsonl", [{**r, "split": "train"} for r in ROWS])  # no test split
    rep = check_experiment(_spec(tmp_path, monkeypatch, probes={"types": ["chosen", "irr_test"]}))
    assert rep.errors == ["probe type irr_test: the preference table has no 'test' split to draw unrelated "
                          "answers from"]
    assert any("no held-out (test) split" in w for w in rep.warnings)


def test_corpus_file_is_checked(tmp_path, monkeypatch):
    _write(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\nnot json\n')
    rep = check_experiment(_spec(tmp_path, monkeypatch, model={"corpus": "c.jsonl"}))
    assert len(rep.errors) == 1 and "c.jsonl, row 2: not a JSON object" in rep.errors[0]


def test_cli_check_one_experiment_and_exit_code(tmp_path):
    (tmp_path / "assets").mkdir()
    _write(tmp_path / "d.jsonl", ROWS)
    decl = ("dataset: {kind: local, path: %s, columns: {example_id: id, prompt: question, chosen: good, "
            "rejected: bad}}\nprobes: {n_examples: 4}\nruns: [{name: sft, algo: sft}]\n")
    (tmp_path / "assets" / "good.yaml").write_text("name: good\n" + decl % "d.jsonl")
    (tmp_path / "assets" / "bad.yaml").write_text("name: bad\n" + decl % "missing.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    r = subprocess.run([LDPIPE, "check", "-e", "good"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0 and "bad:" not in r.stdout, r.stdout + r.stderr
    r = subprocess.run([LDPIPE, "check"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'missing.jsonl'} does not exist")
    r = subprocess.run([LDPIPE, "check", "-e", "nope"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 2 and "unknown experiment(s) ['nope']" in r.stderr
    assert not (tmp_path / ".ldpipe").exists()      # check writes nothing


def test_declarations_only_skips_the_files(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "x.yaml").write_text("name: x\ndataset: {kind: local, path: missing.jsonl}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    r = subprocess.run([LDPIPE, "check", "--declarations-only"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 0 and "1 experiment(s) OK" in r.stdout
