from pathlib import Path

import pytest

from ldpipe.errors import SpecError
from ldpipe.spec import load_experiment, load_experiments, parse_experiment

REPO = Path(__file__).resolve().parents[1]


def test_repo_declarations_parse():
    specs = load_experiments(REPO / "assets")
    names = [s.name for s in specs]
    assert "default" in names
    default = specs[names.index("default")]
    assert default.dataset.kind == "synthetic" and default.runs and default.runs[0].algo == "sft"


def test_typo_key_is_named(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nruns:\n  - name: a\n    learning_rate: 0.1\n")
    with pytest.raises(SpecError) as e:
        load_experiment(p)
    msg = str(e.value)
    assert str(p) in msg and "runs[a].learning_rate" in msg and "unknown key" in msg


@pytest.mark.parametrize("body,needle", [
    ("name: x\nruns:\n  - name: a\n    batch_size: 0\n", "runs[a].batch_size"),
    ("name: x\nruns:\n  - name: a\n    epochs: -1\n", "runs[a].epochs"),
    ("name: x\nprobes: {n_examples: abc}\n", "probes.n_examples"),
    ("name: x\ndataset: {kind: local}\n", "needs dataset.path"),
    ("name: x\nmodel: {kind: pretrained}\n", "needs model.name_or_path"),
    ("name: Bad-Name\n", "name"),
    ("name: x\nruns:\n  - {name: a}\n  - {name: a}\n", "duplicate run name"),
    ("name: x\nmodel: {architecture: {hidden_size: 130, num_heads: 4}}\n", "not divisible"),
    ("- just\n- a list\n", "expected a mapping"),
    ("name: x\nruns: [\n", "YAML syntax error"),
])
def test_bad_declarations(tmp_path, body, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(SpecError) as e:
        load_experiment(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_invalid_utf8(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: x\ndescription: \xff\xfe\n")
    with pytest.raises(SpecError, match="not valid UTF-8"):
        load_experiment(p)


def test_duplicate_experiment_names(tmp_path):
    (tmp_path / "a.yaml").write_text("name: same\n")
    (tmp_path / "b.yaml").write_text("name: same\n")
    with pytest.raises(SpecError, match="already declared"):
        load_experiments(tmp_path)


def test_config_hash_tracks_settings():
    a = parse_experiment({"name": "x", "runs": [{"name": "r"}]}, source="t")
    b = parse_experiment({"name": "x", "runs": [{"name": "r", "lr": 1e-3}]}, source="t")
    c = parse_experiment({"name": "x", "runs": [{"name": "r"}]}, source="t")
    assert a.run_config_hash(a.runs[0]) == c.run_config_hash(c.runs[0])
    assert a.run_config_hash(a.runs[0]) != b.run_config_hash(b.runs[0])
    # the base model does not depend on run settings, so it is reused across runs
    assert a.model_config_hash() == b.model_config_hash()
