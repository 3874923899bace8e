"""ldpipe.data.loaders on small real files written here (JSONL, gzip, Parquet, CSV), through `datasets`."""
from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import polars as pl
import pytest

from ldpipe.data.loaders import (
    DataSource,
    extract_hh_prompt,
    load_hh,
    load_local,
    load_preferences,
    load_reference_probes,
    load_ultrafeedback,
    reference_to_preferences,
    validate_preferences,
)
from ldpipe.errors import DataValidationError, LdpipeError, SpecError
from ldpipe.schema import CORE_RESPONSE_TYPES, PREFERENCE_SCHEMA, PROBE_SCHEMA

P1 = "\n\nHuman: Hi there\n\nAssistant:"
# Multi-turn: the prompt must end at the LAST assistant marker, keeping the earlier assistant turn.
P2 = "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another one?\n\nAssistant:"


def write_jsonl(path: Path, rows: list[dict], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def hh_rows() -> list[dict]:
    return [
        {"chosen": P1 + " Hello! How can I help?", "rejected": P1 + " Go away."},
        {"chosen": P2 + " Banana.", "rejected": P2 + " No."},
        {"chosen": P1 + " Hi.", "rejected": P1 + " "},  # whitespace-only y- exists in HH test (row 120)
    ]


def expect_error(fn, *, file: Path | str, row: int | None, field: str | None) -> DataValidationError:
    with pytest.raises(DataValidationError) as ei:
        fn()
    e = ei.value
    assert Path(e.source) == Path(file), str(e)
    assert e.row == row, str(e)
    assert e.field == field, str(e)
    msg = str(e)
    assert str(file) in msg
    if row is not None:
        assert f"row {row}" in msg
    if field is not None:
        assert f"'{field}'" in msg
    return e


# --------------------------------------------------------------------------- HH


def test_extract_hh_prompt_cuts_at_last_assistant_marker():
    assert extract_hh_prompt(P2 + " Banana.") == P2
    assert extract_hh_prompt(P2 + " Banana.").count("\n\nAssistant:") == 2
    with pytest.raises(LdpipeError, match="Assistant"):
        extract_hh_prompt("\n\nHuman: no reply marker here")


def test_hh_raw_jsonl_splits_prompt_and_responses(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", hh_rows())
    df = load_hh("train", source=f)
    assert df.schema == pl.Schema(PREFERENCE_SCHEMA)
    assert df["example_id"].to_list() == ["hh-train-0", "hh-train-1", "hh-train-2"]
    assert df["prompt"].to_list() == [P1, P2, P1]
    assert df["chosen"].to_list() == [" Hello! How can I help?", " Banana.", " Hi."]
    assert df["rejected"].to_list() == [" Go away.", " No.", " "]
    assert set(df["split"]) == {"train"} and set(df["source"]) == {str(f)}
    # prompt + response reproduces the original transcripts exactly
    for r, (p, c, j) in zip(hh_rows(), df.select("prompt", "chosen", "rejected").iter_rows()):
        assert (p + c, p + j) == (r["chosen"], r["rejected"])
    assert load_hh("train", source=f, limit=2).height == 2


def test_hh_local_copy_directory_with_both_splits(tmp_path):
    # Same layout as the hub repo: <root>/helpful-base/{train,test}.jsonl.gz (a sibling subset is ignored)
    (tmp_path / "helpful-base").mkdir()
    (tmp_path / "harmless-base").mkdir()
    write_jsonl(tmp_path / "helpful-base" / "train.jsonl.gz", hh_rows(), opener=gzip.open)
    write_jsonl(tmp_path / "helpful-base" / "test.jsonl.gz", hh_rows()[:1], opener=gzip.open)
    write_jsonl(tmp_path / "harmless-base" / "train.jsonl.gz", hh_rows()[:1], opener=gzip.open)
    df = load_preferences(DataSource("hh", path=str(tmp_path)))
    assert df.group_by("split").len().sort("split").rows() == [("test", 1), ("train", 3)]
    assert "hh-test-0" in df["example_id"].to_list()
    limited = load_preferences(DataSource("hh", path=str(tmp_path), split="train", limit=2))
    assert limited["example_id"].to_list() == ["hh-train-0", "hh-train-1"]
    with pytest.raises(SpecError, match="one split"):
        load_preferences(DataSource("hh", path=str(tmp_path / "helpful-base" / "train.jsonl.gz")))


def test_hh_rejected_with_other_prompt_is_an_error_or_skipped(tmp_path):
    rows = hh_rows()
    rows[1]["rejected"] = "\n\nHuman: Name a vegetable.\n\nAssistant: Carrot." + rows[1]["rejected"][len(P2) - 40:]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    e = expect_error(lambda: load_hh("train", source=f), file=f, row=2, field="rejected")
    assert "hh-train-1" in str(e) and "prompt" in str(e)
    kept = load_hh("train", source=f, on_invalid="skip")
    assert kept["example_id"].to_list() == ["hh-train-0", "hh-train-2"]  # ids keep the original index


def test_hh_empty_response_is_an_error(tmp_path):
    rows = hh_rows()
    rows[2]["chosen"] = P1  # nothing after the last marker
    f = write_jsonl(tmp_path / "test.jsonl", rows)
    e = expect_error(lambda: load_hh("test", source=f), file=f, row=3, field="chosen")
    assert "empty" in str(e)


# --------------------------------------------------------------------------- UltraFeedback


def uf_rows() -> list[dict]:
    def conv(q: str, a: str) -> list[dict]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [
        {"prompt": "What is 2+2?", "prompt_id": "a", "chosen": conv("What is 2+2?", "4"),
         "rejected": conv("What is 2+2?", "5"), "score_chosen": 9.0, "score_rejected": 2.0},
        {"prompt": "Say hi", "prompt_id": "b", "chosen": conv("Say hi", "Hi!"),
         "rejected": conv("Say hi", "No."), "score_chosen": 8.0, "score_rejected": 1.0},
    ]


def test_ultrafeedback_raw_parquet_and_jsonl(tmp_path):
    data = tmp_path / "uf" / "data"
    data.mkdir(parents=True)
    pl.DataFrame(uf_rows()).write_parquet(data / "train_prefs-00000-of-00001.parquet")
    pl.DataFrame(uf_rows()[:1]).write_parquet(data / "train_sft-00000-of-00001.parquet")  # must be ignored
    df = load_ultrafeedback("train", source=tmp_path / "uf")
    assert df["prompt"].to_list() == ["Human: What is 2+2?\nAssistant:", "Human: Say hi\nAssistant:"]
    assert df["chosen"].to_list() == ["4", "Hi!"] and df["rejected"].to_list() == ["5", "No."]
    assert df["example_id"].to_list() == ["uf-train-0", "uf-train-1"]

    f = write_jsonl(tmp_path / "test_prefs.jsonl", uf_rows())
    dj = load_preferences(DataSource("ultrafeedback", path=str(f), split="test"))
    assert dj.drop("source", "example_id", "split").equals(df.drop("source", "example_id", "split"))
    assert set(dj["split"]) == {"test"}


def test_ultrafeedback_message_one_must_be_the_assistant(tmp_path):
    rows = uf_rows()
    rows[1]["rejected"] = [{"role": "user", "content": "Say hi"}]
    f = write_jsonl(tmp_path / "uf.jsonl", rows)
    e = expect_error(lambda: load_ultrafeedback("train", source=f), file=f, row=2, field="rejected")
    assert "assistant" in str(e)
    rows[1]["rejected"] = "plain text"
    f = write_jsonl(tmp_path / "uf2.jsonl", rows)
    expect_error(lambda: load_ultrafeedback("train", source=f), file=f, row=2, field="rejected")


# --------------------------------------------------------------------------- local files


MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad", "example_id": "qid", "split": "part"}
LOCAL = [
    {"qid": "q1", "part": "train", "question": "Q: 1+1?", "good": "2", "bad": "3"},
    {"qid": "q2", "part": "test", "question": "Q: capital of France?", "good": "Paris", "bad": "Rome"},
    {"qid": "q3", "part": "train", "question": "Q: colour of sky?", "good": "blue", "bad": "green"},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_local_files_with_column_mapping(tmp_path, fmt):
    f = tmp_path / f"prefs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(f, LOCAL)
    elif fmt == "parquet":
        pl.DataFrame(LOCAL).write_parquet(f)
    else:
        pl.DataFrame(LOCAL).write_csv(f)
    src = DataSource("local", path=str(f), columns=MAPPING)
    df = load_preferences(src)
    assert df.schema == pl.Schema(PREFERENCE_SCHEMA)
    assert df.sort("example_id").select("example_id", "split", "prompt", "chosen", "rejected").rows() == [
        (r["qid"], r["part"], r["question"], r["good"], r["bad"]) for r in LOCAL]
    assert load_preferences(src, splits=("test",))["example_id"].to_list() == ["q2"]
    one_per_split = load_preferences(DataSource("local", path=str(f), columns=MAPPING, limit=1))
    assert one_per_split["example_id"].to_list() == ["q1", "q2"]


def test_local_defaults_generated_ids_and_csv_text(tmp_path):
    f = tmp_path / "plain.csv"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["Count:", "42", "NA"])             # numbers and "NA" stay text
        w.writerow(["Two\nline prompt", "yes", "no"])  # a quoted cell spanning two lines
        w.writerow(["", "a", "b"])                     # empty prompt on line 5
    e = expect_error(lambda: load_local(f), file=f, row=5, field="prompt")
    assert "empty" in str(e)
    f.write_text(f.read_text().rsplit("\n", 2)[0] + "\n", encoding="utf-8")  # drop the bad row
    df = load_preferences(DataSource("local", path=str(f), split="test"))
    assert df["example_id"].to_list() == ["plain-0", "plain-1"]
    assert df["chosen"].to_list() == ["42", "yes"] and df["rejected"][0] == "NA"
    assert set(df["split"]) == {"test"}


# --------------------------------------------------------------------------- reference probe jsonl

REF_KEYS = ["prompt", "chosen", "chosen_initial", "chosen_selfr", "chosen_gptsemantic", "chosen_gptformat", "rejected",
            "reject_gptsemantic", "reject_gptformat", "irr_train", "irr_test", "irr_hum", "random_permute",
            "random_nonhum"]


def ref_rows(n: int = 3) -> list[dict]:
    return [{k: (f"\n\nHuman: question {i}?\n\nAssistant:" if k == "prompt" else f" {k} answer {i}")
             for k in REF_KEYS} for i in range(n)]


def test_reference_probes_give_13_types_per_prompt(tmp_path):
    f = write_jsonl(tmp_path / "formal_prob_train.jsonl", ref_rows())
    df = load_reference_probes(f)
    assert df.schema == pl.Schema(PROBE_SCHEMA)
    assert df.height == 3 * 13
    expected_types = [t for t in CORE_RESPONSE_TYPES if t != "random_tokens"]
    for ex, g in df.group_by("example_id", maintain_order=True):
        assert g["response_type"].to_list() == expected_types
    row1 = df.filter(pl.col("example_id") == "formal_prob_train-1")
    for t, resp, prov in row1.select("response_type", "response", "provenance").iter_rows():
        assert resp == f" {t} answer 1" and prov == f"reference:{t}"
    assert set(row1["prompt"]) == {"\n\nHuman: question 1?\n\nAssistant:"}
    assert load_reference_probes(f, limit=2)["example_id"].n_unique() == 2
    prefs = reference_to_preferences(f, split="test")
    assert prefs["example_id"].to_list() == df["example_id"].unique(maintain_order=True).to_list()
    assert prefs["chosen"].to_list() == [f" chosen answer {i}" for i in range(3)]
    assert set(prefs["split"]) == {"test"}


def test_reference_probes_accept_notebook_spelling(tmp_path):
    rows = ref_rows(2)
    for r in rows:
        r["rejected_gptsemantic"] = r.pop("reject_gptsemantic")
        r["rejected_gptformat"] = r.pop("reject_gptformat")
    f = write_jsonl(tmp_path / "nb.jsonl", rows)
    df = load_reference_probes(f)
    got = df.filter(pl.col("response_type") == "reject_gptsemantic")
    assert got["response"].to_list() == [" reject_gptsemantic answer 0", " reject_gptsemantic answer 1"]
    assert set(got["provenance"]) == {"reference:rejected_gptsemantic"}
    assert df.height == 2 * 13
    rows[0]["reject_gptsemantic"] = "both spellings"
    f2 = write_jsonl(tmp_path / "both.jsonl", rows)
    with pytest.raises(DataValidationError, match="alias"):
        load_reference_probes(f2)


def test_reference_probe_row_missing_a_key(tmp_path):
    rows = ref_rows()
    del rows[1]["irr_hum"]
    f = tmp_path / "r.jsonl"
    # a blank line 2 shifts the record onto line 3; the limit must not lose that mapping
    f.write_text("\n\n".join(json.dumps(r) for r in rows[:2]) + "\n" + json.dumps(rows[2]) + "\n")
    expect_error(lambda: load_reference_probes(f, limit=2), file=f, row=3, field="irr_hum")


# --------------------------------------------------------------------------- error cases


def test_missing_column_names_column_and_available_ones(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "good": "a", "worse": "b"}])
    e = expect_error(lambda: load_local(f, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}),
                     file=f, row=None, field="bad")
    assert "missing column" in str(e) and "worse" in str(e) and "question" in str(e)


def test_empty_prompt_names_line(tmp_path):
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "   ", "chosen": "a", "rejected": "b"}]
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")  # blank line 2
    expect_error(lambda: load_local(f), file=f, row=3, field="prompt")


@pytest.mark.parametrize("bad", [7, ["a", "b"], True])
def test_non_string_response_in_json(tmp_path, bad):
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "a", "rejected": bad}]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    e = expect_error(lambda: load_local(f), file=f, row=2, field="rejected")
    assert "expected a string" in str(e)


def test_non_string_response_in_parquet(tmp_path):
    f = tmp_path / "x.parquet"
    pl.DataFrame({"prompt": ["p1", "p2"], "chosen": ["a", "b"], "rejected": [None, 5]}).write_parquet(f)
    e = expect_error(lambda: load_local(f), file=f, row=2, field="rejected")
    assert "expected text" in str(e)


def test_duplicate_example_id_names_both_rows(tmp_path):
    rows = [{"id": x, "prompt": "p", "chosen": "a", "rejected": "b"} for x in ("a", "b", "c", "b")]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    e = expect_error(lambda: load_local(f, columns={"example_id": "id"}), file=f, row=4, field="example_id")
    assert "row 2" in str(e) and "'b'" in str(e)


def test_invalid_utf8_names_file_line_and_offset(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n"
    bad = b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}\n'
    for name in ("x.jsonl", "x.csv"):
        f = tmp_path / name
        if name.endswith(".csv"):
            good_csv = b"prompt,chosen,rejected\np,a,b\n"
            f.write_bytes(good_csv + b"p,caf\xe9,b\n")
            offset, line = len(good_csv) + 5, 3
        else:
            f.write_bytes(good + bad)
            offset, line = len(good) + bad.index(b"\xe9"), 2
        field = None if name.endswith(".csv") else "chosen"   # a JSON line's bad byte is traced to its key
        e = expect_error(lambda: load_local(f), file=f, row=line, field=field)
        assert "UTF-8" in str(e) and f"byte offset {offset}" in str(e)


def test_validate_preferences_on_a_frame():
    df = pl.DataFrame({"example_id": ["a", "b", "a"], "split": ["train"] * 3, "prompt": ["p"] * 3,
                       "chosen": ["x", "y", "z"], "rejected": ["u", "v", "w"], "source": [None] * 3},
                      schema=PREFERENCE_SCHEMA)
    e = expect_error(lambda: validate_preferences(df, "frame"), file="frame", row=3, field="example_id")
    assert "row 1" in str(e)
    df2 = df.with_columns(pl.Series("example_id", ["a", "b", "c"]), pl.Series("chosen", ["x", "", "z"]))
    expect_error(lambda: validate_preferences(df2, "frame"), file="frame", row=2, field="chosen")
    assert validate_preferences(df2, "frame", on_invalid="skip")["example_id"].to_list() == ["a", "c"]
    e = expect_error(lambda: validate_preferences(df.drop("rejected"), "frame"), file="frame", row=None,
                     field="rejected")
    assert "available columns" in str(e)


def test_data_source_declaration_errors():
    with pytest.raises(SpecError):
        DataSource("nope")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="path"):
        DataSource("local")
    with pytest.raises(SpecError, match="columns"):
        DataSource("hh", columns={"prompt": "q"})
    with pytest.raises(SpecError, match="mapping"):
        DataSource("local", path="x.jsonl", columns={"question": "q"})
    with pytest.raises(LdpipeError, match="synthetic"):
        load_preferences(DataSource("synthetic"))


# --------------------------------------------------------------------------- hub path offline


def test_hub_path_fails_fast_when_offline(monkeypatch):
    import datasets

    def no_hub(*a, **k):  # guard: offline must be detected before the hub client is touched
        raise AssertionError("datasets.load_dataset was called while offline")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    for call, hub_id in ((lambda: load_hh("train", limit=5), "Anthropic/hh-rlhf"),
                         (lambda: load_ultrafeedback("test"), "HuggingFaceH4/ultrafeedback_binarized"),
                         (lambda: load_preferences(DataSource("hh")), "Anthropic/hh-rlhf")):
        with pytest.raises(LdpipeError) as ei:
            call()
        assert hub_id in str(ei.value) and "source=" in str(ei.value) and "offline" in str(ei.value)
        assert not isinstance(ei.value, DataValidationError)
    assert time.monotonic() - t0 < 2.0
