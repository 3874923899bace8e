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


# ------------------------------------------------------------------ sizes a run would fail on (issue 22, item 5)

def _synthetic(monkeypatch, tmp_path, **over) -> ExperimentSpec:
    monkeypatch.setenv("LDPIPE_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("LDPIPE_HOME", str(tmp_path / ".ldpipe"))
    body = {"name": "big", "runs": [{"name": "sft", "algo": "sft"}]}
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    return ExperimentSpec.model_validate(body)


def test_probe_prompts_beyond_the_train_rows_name_the_key_and_both_numbers(tmp_path, monkeypatch):
    rep = check_experiment(_synthetic(monkeypatch, tmp_path, probes={"n_examples": 10**9}))
    assert any("probes.n_examples 1,000,000,000" in e and "200 rows of dataset.synthetic.n_train" in e
               for e in rep.errors), rep.errors
    _write(tmp_path / "d.jsonl", ROWS)                    # a local file: 8 train rows
    rep = check_experiment(_spec(tmp_path, monkeypatch, probes={"n_examples": 10**9}))
    assert rep.errors == ["probes.n_examples 1,000,000,000 is more than the 8 rows of the train split of "
                          "dataset.path 'd.jsonl': the probe prompts are drawn from the train split; lower "
                          "probes.n_examples or add rows"]


def test_synthetic_world_bounds_are_the_dataset_steps_own(tmp_path):
    import pytest
    from pydantic import ValidationError

    from ldpipe.data.synthetic import SyntheticConfig
    from ldpipe.errors import DataValidationError

    for n in (10**9, 3):
        with pytest.raises(ValidationError, match=r"n_entities: must be in \[4, 5000\], got " + str(n)):
            ExperimentSpec.model_validate({"name": "x", "dataset": {"synthetic": {"n_entities": n}}})
        with pytest.raises(DataValidationError, match=r"must be in \[4, 5000\]"):   # the run's, same words
            SyntheticConfig(n_entities=n).validate()
    for n in (4, 5000):
        ExperimentSpec.model_validate({"name": "x", "dataset": {"synthetic": {"n_entities": n}}})


def test_builtin_architecture_too_big_for_the_machine(tmp_path, monkeypatch):
    wide = {"architecture": {"hidden_size": 65536, "num_layers": 1000, "num_heads": 4}}
    rep = check_experiment(_synthetic(monkeypatch, tmp_path, model=wide))
    assert len(rep.errors) == 1 and "17,247,836,950,528 parameters" in rep.errors[0], rep.errors
    assert "memory available on this machine" in rep.errors[0]
    rep = check_experiment(_synthetic(monkeypatch, tmp_path))       # the default: 1.3M parameters, fits
    assert rep.errors == [] and any("1,317,632 parameters" in x for x in rep.lines), rep.errors
    import ldpipe.preflight as pf

    monkeypatch.setattr(pf, "available_memory", lambda: 50 * 2**20)  # a machine with 50 MB free
    rep = check_experiment(_synthetic(monkeypatch, tmp_path))
    assert any("more than the 50 MB of memory available" in e for e in rep.errors), rep.errors


def test_absurd_lengths_and_step_counts(tmp_path, monkeypatch):
    rep = check_experiment(_synthetic(monkeypatch, tmp_path, probes={"generation": {"max_new_tokens": 10**9}}))
    assert rep.errors == ["probes.generation.max_new_tokens (1,000,000,000) is more than the builtin model's 512 "
                          "positions (model.architecture.max_position_embeddings)"]
    rep = check_experiment(_synthetic(monkeypatch, tmp_path, runs=[
        {"name": "dpo", "algo": "dpo", "pairs": "on_policy", "on_policy": {"max_new_tokens": 10**8}}]))
    assert any("runs[dpo].on_policy.max_new_tokens (100,000,000) must be below probes.max_response_tokens (64)" in e
               for e in rep.errors), rep.errors
    rep = check_experiment(_synthetic(monkeypatch, tmp_path, runs=[{"name": "sft", "epochs": 1e9}]))
    assert rep.errors == [] and len(rep.warnings) == 1, rep.warnings
    assert "25,000,000,000 optimizer steps x 2,500,000,002 probe evaluations" in rep.warnings[0]
    assert "runs[sft].epochs 1e+09" in rep.warnings[0]
    rep = check_experiment(_synthetic(monkeypatch, tmp_path, runs=[{"name": "sft", "batch_size": 10**9}]))
    assert rep.errors == [] and rep.warnings == [
        "run 'sft': runs[sft].batch_size 1,000,000,000 is more than its 200 training examples, so every step "
        "takes all 200"]
