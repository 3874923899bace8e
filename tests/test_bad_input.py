"""Promise 4: malformed datasets, probe files and declarations each give a clear error naming the source, the
row and the field; the CLI exits non-zero; the Dagster step fails (the run does not crash); nothing is written.

Table-driven. Data and model kinds are one experiment each in ONE project, so a single `ldpipe run` (subprocess)
and a single in-process `dg.materialize` exercise them all: each experiment's failing step must carry its own
message. Declaration (YAML) kinds fail before any step exists, so they go through `ldpipe check` and the
definitions loader instead.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ldpipe.data.loaders import MAX_TEXT_CHARS
from ldpipe.defs.experiments import build_defs
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.errors import SpecError
from ldpipe.spec import load_experiments

LDPIPE = str(Path(sys.executable).parent / "ldpipe")
REPO = Path(__file__).resolve().parents[1]
REF_KEYS = ("chosen", "rejected", "chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat",
            "irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum", "chosen_initial", "chosen_selfr")


def _pair(i: int, **over) -> dict:
    return {"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": f" answer {i}", "rejected": " no", **over}


def _jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _ref(i: int, **over) -> dict:
    row = {"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", **{k: f" {k} {i}" for k in REF_KEYS}, **over}
    return {k: v for k, v in row.items() if v is not None}


# kind -> (data file name, bytes, dataset kind, failing asset, needles: source file, row, field, problem)
DATA_KINDS = {
    "missing_field": ("pairs.jsonl", _jsonl(_pair(0), {"prompt": "Q", "chosen": " a"}), "local",
                      "dataset", ("pairs.jsonl", "row 2", "field 'rejected'", "missing value")),
    "wrong_type": ("pairs.jsonl", _jsonl(_pair(0), _pair(1, chosen=42)), "local",
                   "dataset", ("pairs.jsonl", "row 2", "field 'chosen'", "expected a string, got a JSON number")),
    "empty_string": ("pairs.jsonl", _jsonl(_pair(0), _pair(1, prompt="")), "local",
                     "dataset", ("pairs.jsonl", "row 2", "field 'prompt'", "empty prompt")),
    "duplicate_id": ("pairs.jsonl", _jsonl(*(_pair(i, example_id=e) for i, e in enumerate(("e1", "e2", "e1")))), "local",
                     "dataset", ("pairs.jsonl", "row 3", "field 'example_id'", "duplicate example_id 'e1'")),
    "invalid_utf8": ("pairs.jsonl", _jsonl(_pair(0)) + b'{"prompt": "Q", "chosen": " caf\xe9", "rejected": " b"}\n',
                     "local", "dataset", ("pairs.jsonl", "row 2", "field 'chosen'", "invalid UTF-8 byte 0xe9")),
    "over_long_text": ("pairs.jsonl", _jsonl(_pair(0), _pair(1, chosen=" x" * (MAX_TEXT_CHARS // 2 + 1))), "local",
                       "dataset", ("pairs.jsonl", "row 2", "field 'chosen'", "longer than 100,000 characters")),
    "csv_missing_column": ("pairs.csv", b"prompt,chosen\nQ1,a\n", "local",
                           "dataset", ("pairs.csv", "field 'rejected'", "missing column 'rejected'")),
    "probe_file_missing_response": ("probes.jsonl", _jsonl(_ref(0), _ref(1, irr_hum=None)), "reference_probes",
                                    "dataset", ("probes.jsonl", "row 2", "field 'irr_hum'", "missing value")),
    "probe_file_wrong_type": ("probes.jsonl", _jsonl(_ref(0), _ref(1), _ref(2, irr_test=[" a list"])),
                              "reference_probes", "dataset",
                              ("probes.jsonl", "row 3", "field 'irr_test'", "got a JSON array")),
    "bad_model_path": ("pairs.jsonl", _jsonl(_pair(0), _pair(1)), "local",
                       "base_model", ("model.name_or_path", "no_such_model_dir", "does not exist")),
}

# kind -> (declaration body, needles: key path and problem)
YAML_KINDS = {
    "yaml_key_typo": ("name: x\nruns:\n  - {name: a, learning_rate: 0.1}\n", ("runs[a].learning_rate", "unknown key")),
    "yaml_zero_size": ("name: x\nruns:\n  - {name: a, batch_size: 0}\n", ("runs[a].batch_size", "greater than 0")),
    "yaml_negative_size": ("name: x\nprobes: {n_examples: -3}\n", ("probes.n_examples", "greater than 0")),
    "yaml_wrong_type": ("name: x\nruns:\n  - {name: a, epochs: three}\n", ("runs[a].epochs", "valid number")),
    "yaml_unknown_response_type": ("name: x\nprobes: {types: [chosen, chosen_gptsemantc]}\n",
                                   ("probes.types", "unknown response type(s) ['chosen_gptsemantc']")),
    "yaml_unknown_supervise_type": ("name: x\nruns:\n  - {name: a, supervise: irr_hmu}\n",
                                    ("runs[a]", "supervise 'irr_hmu' is not a response type")),
    "yaml_empty_string": ("name: ''\n", ("name", "must match")),
    # a repeated key would silently replace the first (a second `runs:` drops every run declared before it)
    "yaml_duplicate_key": ("name: x\nruns:\n  - {name: a}\nruns:\n  - {name: b}\n",
                           ("duplicate key 'runs'", "first at line 2")),
    "yaml_duplicate_nested_key": ("name: x\nruns:\n  - {name: a, lr: 0.1, lr: 0.2}\n", ("duplicate key 'lr'",)),
    "yaml_name_with_newline": ('name: "x\\n"\n', ("name", "must match", "exactly")),
    "yaml_infinite_float": ("name: x\nruns:\n  - {name: a, epochs: .inf}\n", ("runs[a].epochs", "finite number")),
    "yaml_deep_nesting": ("name: x\ndescription: " + "[" * 20000 + "]" * 20000 + "\n",
                          ("nested more than 50 levels",)),
}


def _declaration(kind: str) -> str:
    fname, _, ds_kind, _, _ = DATA_KINDS[kind]
    model = "no_such_model_dir" if kind == "bad_model_path" else "nowhere"
    return (f"name: {kind}\ndataset: {{kind: {ds_kind}, path: {kind}/{fname}}}\n"
            f"probes: {{n_examples: 2, selection: first}}\n"
            f"model: {{kind: pretrained, name_or_path: ./{model}}}\n")


@pytest.fixture(scope="module")
def data_project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("bad_input") / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "sql").symlink_to(REPO / "sql")
    for kind, (fname, data, *_rest) in DATA_KINDS.items():
        (proj / kind).mkdir()
        (proj / kind / fname).write_bytes(data)
        (proj / "assets" / f"{kind}.yaml").write_text(_declaration(kind))
    return proj


def _env(proj: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "LDPIPE_PROJECT_DIR": str(proj), "LDPIPE_HOME": str(home), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cli_run(data_project):
    """`ldpipe run` over every data/model kind at once, as a user would start it."""
    home = data_project / ".ldpipe-cli"
    r = subprocess.run([LDPIPE, "run", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       cwd=data_project, env=_env(data_project, home))
    return r, home


@pytest.fixture(scope="module")
def dagster_run(data_project):
    """The same graph materialized in-process with raise_on_error=False."""
    home = data_project / ".ldpipe-dg"
    mp = pytest.MonkeyPatch()
    mp.setenv("LDPIPE_PROJECT_DIR", str(data_project))
    mp.setenv("LDPIPE_HOME", str(home))
    try:
        defs = build_defs(load_experiments(data_project / "assets"))
        assets = list(defs.assets)
        # the per-experiment steps only (the CLI run covers the shared catalog and analyses)
        wanted = [k for a in assets for k in a.keys if k.path[-1] in ("dataset", "probe_set", "base_model")]
        result = dg.materialize(assets, selection=wanted, resources={"ldpipe_home": LdpipeHome(),
                                                                     "compute": Compute(device="cpu")},
                                instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    finally:
        mp.undo()
    failures = {}
    for e in result.all_events:
        if e.event_type_value == "STEP_FAILURE":
            err = e.step_failure_data.error
            text = []
            while err is not None:          # the user error sits in the cause chain of Dagster's wrapper
                text.append(err.message)
                err = err.cause
            failures[e.step_key] = "\n".join(text)
    return result, failures, home


@pytest.mark.parametrize("kind", sorted(DATA_KINDS))
def test_bad_data_or_model_fails_its_step_with_a_named_error_and_writes_nothing(kind, cli_run, dagster_run):
    _fname, _data, _ds, asset, needles = DATA_KINDS[kind]
    result, failures, home = dagster_run
    assert not result.success
    step = f"{kind}__{asset}"
    # exactly this experiment's failing asset failed (the others of this experiment were skipped, not run)
    assert [s for s in failures if s.startswith(f"{kind}__")] == [step], failures.keys()
    for needle in needles:
        assert needle in failures[step], (needle, failures[step])
    assert "Traceback" not in failures[step].splitlines()[0]
    # no partial output: nothing for this experiment's failed asset, and no temp file anywhere
    for h in (home, cli_run[1]):
        ds = h / "datasets" / kind
        if asset == "dataset":
            assert not (ds / "preferences.parquet").exists() and not (ds / "probes.parquet").exists()
        assert not (h / "models" / kind).exists()
        assert not [p for p in h.rglob("*") if ".tmp-" in p.name]

    r, _ = cli_run
    assert r.returncode == 1, r.stderr[-2000:]                   # a failed run, not a crash (2) or a signal
    assert "ldpipe run FAILED" in r.stderr
    out = r.stdout + r.stderr
    for needle in needles:
        assert needle in out, needle


def test_good_steps_still_ran(dagster_run):
    """A bad experiment does not stop the others: the model-path kind's (good) dataset materialized."""
    result, failures, home = dagster_run
    mats = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert "bad_model_path/dataset" in mats and "bad_model_path/probe_set" in mats
    assert (home / "datasets" / "bad_model_path" / "preferences.parquet").is_file()
    assert set(failures) == {f"{k}__{DATA_KINDS[k][3]}" for k in DATA_KINDS}


@pytest.mark.parametrize("oddity", ["directory", "symlink_loop"])
def test_unreadable_declaration_is_one_line_and_exit_2(oddity, tmp_path):
    decl = tmp_path / "assets" / "x.yaml"
    decl.parent.mkdir()
    if oddity == "directory":
        decl.mkdir()
    else:
        decl.symlink_to(decl.name)   # x.yaml -> x.yaml
    r = subprocess.run([LDPIPE, "check", "--dir", str(decl.parent)], capture_output=True, text=True, timeout=120,
                       env=_env(tmp_path, tmp_path / ".ldpipe"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(decl) in r.stderr and "cannot read the declaration" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", sorted(YAML_KINDS))
def test_bad_declaration_names_file_and_key_and_exits_2(kind, tmp_path):
    body, needles = YAML_KINDS[kind]
    decl = tmp_path / "assets" / f"{kind}.yaml"
    decl.parent.mkdir()
    decl.write_text(body)
    # the definitions loader (what `dg dev` and `ldpipe run` call) refuses it with the same message
    with pytest.raises(SpecError) as e:
        load_experiments(decl.parent)
    for needle in (str(decl), *needles):
        assert needle in str(e.value), (needle, str(e.value))
    r = subprocess.run([LDPIPE, "check", "--dir", str(decl.parent)], capture_output=True, text=True, timeout=120,
                       env=_env(tmp_path, tmp_path / ".ldpipe"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and str(decl) in r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    assert not (tmp_path / ".ldpipe").exists()                  # nothing was built from a bad declaration


def test_bad_declaration_stops_ldpipe_run_before_any_step(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "sql").symlink_to(REPO / "sql")
    (tmp_path / "assets" / "x.yaml").write_text(YAML_KINDS["yaml_zero_size"][0])
    r = subprocess.run([LDPIPE, "run"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=_env(tmp_path, tmp_path / ".ldpipe"))
    assert r.returncode == 2 and "runs[a].batch_size" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / ".ldpipe").exists()


# file -> (bytes, the whole message after the file's path) for files that held no readable row: each used to end in
# a library's words ("StopIteration:", 'Instruction "train" corresponds to no data!', "DatasetGenerationError")
PLAIN_WORDS = {
    "empty.jsonl": (b"", ": empty file: no rows"),
    "blank.jsonl": (b"\n  \n", ": no rows: the file holds only blank lines"),
    "header_only.csv": (b"prompt,chosen,rejected\n",
                        ', row 1: CSV has a header but no rows (header: ["prompt", "chosen", "rejected"])'),
    "surrogate.jsonl": (_jsonl(_pair(0), _pair(1)) + b'{"prompt": "Q", "chosen": " a\\ud800", "rejected": " b"}\n',
                        ", row 3, field 'chosen': a lone surrogate \\ud800 is not valid text (a JSON \\ud800-\\udfff "
                        "escape must be one of a pair)"),
}


@pytest.mark.parametrize("name", sorted(PLAIN_WORDS))
def test_unreadable_file_is_named_in_plain_words(name, tmp_path):
    from ldpipe.data.loaders import DataSource, load_preferences
    from ldpipe.errors import DataValidationError

    data, said = PLAIN_WORDS[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataValidationError) as e:
        load_preferences(DataSource(kind="local", path=str(tmp_path / name)))
    assert str(e.value) == f"{tmp_path / name}{said}"


def test_a_surrogate_pair_is_text(tmp_path):
    from ldpipe.data.loaders import DataSource, load_preferences

    (tmp_path / "pair.jsonl").write_bytes(_jsonl(_pair(0)) + b'{"prompt": "Q", "chosen": " \\ud83d\\ude00", '
                                                            b'"rejected": " b"}\n')
    prefs = load_preferences(DataSource(kind="local", path=str(tmp_path / "pair.jsonl")))
    assert prefs["chosen"].to_list()[1] == " \U0001F600"
