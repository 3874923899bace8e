"""`kind: local` reads TRL's preference formats (standard/conversational, explicit/implicit prompt) and splits a
folder by its file names as `datasets`' `data_files` does; real files written here, JSONL and Parquet."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from ldpipe.data.loaders import DataSource, collect_split_notes, load_local, load_preferences
from ldpipe.data.transcript import text_to_reply, transcript_to_messages
from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.probes.build import ProbeRecipe, build_probe_set


def user(t: str) -> dict:
    return {"role": "user", "content": t}


def asst(t: str) -> dict:
    return {"role": "assistant", "content": t}


def system(t: str) -> dict:
    return {"role": "system", "content": t}


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pl.DataFrame(rows).write_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TURNS = [user("Name a fruit."), asst("Apple."), user("Another one?")]
CONV_PROMPT = "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: Another one?\n\nAssistant:"
# format -> (two rows in that format, the (prompt, chosen, rejected) ldpipe stores for them)
FORMATS = {
    "standard_explicit": (
        [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
         {"prompt": "Grass is", "chosen": " green.", "rejected": " blue."}],
        [("The sky is", " blue.", " green."), ("Grass is", " green.", " blue.")]),
    "standard_implicit": (   # TRL's extract_prompt: the shared start; the space before the reply stays with it
        [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
         {"chosen": "Grass is green.", "rejected": "Grass is blue."}],
        [("The sky is", " blue.", " green."), ("Grass is", " green.", " blue.")]),
    "conversational_explicit": (
        [{"prompt": [system("Be brief."), user("What colour is the sky?")], "chosen": [asst("Blue.")],
          "rejected": [asst("Green.")]},
         {"prompt": TURNS, "chosen": [asst("Banana.")], "rejected": [asst("No.")]}],
        [("\n\nSystem: Be brief.\n\nHuman: What colour is the sky?\n\nAssistant:", " Blue.", " Green."),
         (CONV_PROMPT, " Banana.", " No.")]),
    "conversational_implicit": (   # multi-turn: the prompt keeps the earlier assistant turn
        [{"chosen": [user("What colour is the sky?"), asst("Blue.")],
          "rejected": [user("What colour is the sky?"), asst("Green.")]},
         {"chosen": [*TURNS, asst("Banana.")], "rejected": [*TURNS, asst("No.")]}],
        [("\n\nHuman: What colour is the sky?\n\nAssistant:", " Blue.", " Green."),
         (CONV_PROMPT, " Banana.", " No.")]),
    "ultrafeedback_style": (   # a text prompt column and whole conversations: TRL takes the prompt from these
        [{"prompt": "What colour is the sky?", "chosen": [user("What colour is the sky?"), asst("Blue.")],
          "rejected": [user("What colour is the sky?"), asst("Green.")]}],
        [("\n\nHuman: What colour is the sky?\n\nAssistant:", " Blue.", " Green.")]),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_trl_formats_single_file(tmp_path, fmt, suffix):
    rows, want = FORMATS[fmt]
    f = write(tmp_path / f"prefs{suffix}", rows)
    with collect_split_notes() as notes:
        df = load_local(f)
    assert df.select("prompt", "chosen", "rejected").rows() == want
    assert df["example_id"].to_list() == [f"prefs-{i}" for i in range(len(rows))]
    assert set(df["split"]) == {"train"}
    assert len(notes) == 1 and notes[0].startswith(f"prefs{suffix} → train ({len(rows)} row")
    if fmt.startswith("conversational"):
        # the way back to messages that a chat template renders: exactly the TRL prompt and reply
        for (prompt, chosen, _), row in zip(df.select("prompt", "chosen", "rejected").rows(), rows):
            msgs = row.get("prompt") or row["chosen"][:-1]
            assert transcript_to_messages(prompt) == msgs
            assert text_to_reply(chosen) == row["chosen"][-1]["content"]


def test_trl_formats_in_a_hub_style_folder(tmp_path):
    """data/train-00000-of-00001.parquet and data/test-00000-of-00001.parquet, conversational, implicit prompt."""
    rows, want = FORMATS["conversational_implicit"]
    write(tmp_path / "data" / "train-00000-of-00001.parquet", rows)
    write(tmp_path / "data" / "test-00000-of-00001.parquet", rows[:1])
    with collect_split_notes() as notes:
        df = load_preferences(DataSource("local", path=str(tmp_path)))
    assert df.select("split", "prompt", "chosen", "rejected").rows() == [
        ("train", *want[0]), ("train", *want[1]), ("test", *want[0])]
    assert notes == ["data/train-00000-of-00001.parquet → train (2 rows); conversational, implicit prompt",
                     "data/test-00000-of-00001.parquet → test (1 row); conversational, implicit prompt"]


# --------------------------------------------------------------------------- formats ldpipe cannot read


def expect(fn, *, row: int | None, field: str | None, needles: tuple[str, ...]) -> str:
    with pytest.raises(DataValidationError) as ei:
        fn()
    e = ei.value
    assert (e.row, e.field) == (row, field), str(e)
    for n in needles:
        assert n in str(e), str(e)
    return str(e)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_unreadable_formats_are_named_with_the_declaration_that_reads_them(tmp_path, suffix):
    f = write(tmp_path / f"lm{suffix}", [{"messages": [user("hi"), asst("hello")]}])
    expect(lambda: load_local(f), row=None, field="chosen",
           needles=("rows have 'messages' only: that is TRL's (conversational) language-modeling format, not a "
                    "preference format", "prompt/chosen/rejected"))
    f = write(tmp_path / f"sft{suffix}", [{"prompt": "Q", "completion": "A"}])
    expect(lambda: load_local(f), row=None, field="chosen", needles=("TRL's prompt-completion format",))
    f = write(tmp_path / f"kto{suffix}", [{"prompt": "Q", "completion": "A", "label": True}])
    expect(lambda: load_local(f), row=None, field="chosen", needles=("unpaired preference format (KTO",))
    f = write(tmp_path / f"se{suffix}", [{"question": "Q", "response_j": "good", "response_k": "bad"}])
    expect(lambda: load_local(f), row=None, field="chosen",
           needles=("declare dataset.columns: {prompt: question, chosen: response_j, rejected: response_k}",))
    df = load_local(f, columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert df.select("prompt", "chosen", "rejected").rows() == [("Q", "good", "bad")]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_rows_ldpipe_cannot_store(tmp_path, suffix):
    ok = {"prompt": [user("Q")], "chosen": [asst("yes")], "rejected": [asst("no")]}
    cases = [   # (second row, field, needles)
        ({**ok, "chosen": [asst("yes"), user("and?")]}, "chosen", ("expected one assistant message", "got 2 messages")),
        ({**ok, "rejected": [user("no")]}, "rejected", ("a message of role 'user'",)),
        ({**ok, "prompt": [user("a\n\nHuman: b")]}, "prompt", ("turn marker",)),          # TranscriptError
        ({**ok, "prompt": [{"role": "tool", "content": "x"}]}, "prompt", ("role 'tool'",)),
        ({**ok, "prompt": [user("Q"), asst("A")]}, "prompt", ("ends with an assistant message",)),
        ({**ok, "chosen": [asst("")]}, "chosen", ("empty response",)),
    ]
    for i, (bad, field, needles) in enumerate(cases):
        f = write(tmp_path / f"c{i}{suffix}", [ok, bad])
        expect(lambda: load_local(f), row=2, field=field, needles=(str(f), *needles))


def test_implicit_prompt_errors_and_mixed_formats(tmp_path):
    base = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    cases = [
        ({"chosen": "Blue.", "rejected": "Green."}, "chosen", ("share no start", "columns: {prompt: ...}")),
        ({"chosen": "Same.", "rejected": "Same."}, "rejected", ("are the same",)),
        ({"chosen": "Yes", "rejected": "Yes, but"}, "rejected", ("one the start of the other",)),
        ({"chosen": [user("Q"), asst("a")], "rejected": [user("Q"), asst("b")]}, "chosen",
         ("a list of messages, but row 1 holds text", "one format")),
    ]
    for i, (bad, field, needles) in enumerate(cases):
        f = write(tmp_path / f"i{i}.jsonl", [base, bad])
        expect(lambda: load_local(f), row=2, field=field, needles=needles)
    # a text prompt column with bare replies: nothing to take the prompt from (TRL would silently drop it)
    f = write(tmp_path / "bare.jsonl", [{"prompt": "Q", "chosen": [asst("a")], "rejected": [asst("b")]}])
    expect(lambda: load_local(f), row=1, field="chosen", needles=("the prompt column is text",))
    f = write(tmp_path / "mix.jsonl", [{"prompt": [user("Q")], "chosen": "a", "rejected": "b"}])
    expect(lambda: load_local(f), row=1, field="chosen", needles=("text, while the prompt is messages",))
    f = write(tmp_path / "mix2.jsonl", [{"chosen": [user("Q"), asst("a")], "rejected": "Q b"}])
    expect(lambda: load_local(f), row=1, field="rejected", needles=("text, while chosen is messages",))


def test_parquet_values_are_shown_as_text_not_polars_display(tmp_path):
    f = tmp_path / "x.parquet"
    pl.DataFrame({"prompt": ["p1", "p2"], "chosen": [["a"], ["b", "c"]], "rejected": [["x"], ["y"]]}).write_parquet(f)
    msg = expect(lambda: load_local(f), row=1, field="chosen", needles=('(value ["a"])',))
    assert "shape" not in msg and "Series" not in msg
    f = tmp_path / "y.parquet"
    pl.DataFrame({"prompt": [[user("Q")]], "chosen": [[]], "rejected": [[asst("n")]]},
                 schema={"prompt": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
                         "chosen": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
                         "rejected": pl.List(pl.Struct({"role": pl.String, "content": pl.String}))}).write_parquet(f)
    expect(lambda: load_local(f), row=1, field="chosen", needles=("an empty list",))


def test_existing_validation_still_applies_to_conversational_rows(tmp_path):
    ok = {"prompt": [user("Q")], "chosen": [asst("yes")], "rejected": [asst("no")]}
    f = tmp_path / "x.jsonl"
    f.write_bytes(json.dumps(ok).encode() + b"\n\n" + b'{"prompt": [{"role": "user", "content": "caf\xe9"}], '
                  b'"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", '
                  b'"content": "b"}]}\n')
    expect(lambda: load_local(f), row=3, field="prompt", needles=("invalid UTF-8",))
    f = write(tmp_path / "long.jsonl", [ok, {**ok, "rejected": [asst("x" * 100_001)]}])
    expect(lambda: load_local(f), row=2, field="rejected", needles=("longer than 100,000 characters",))
    f = write(tmp_path / "num.jsonl", [ok, {**ok, "chosen": 42}])
    expect(lambda: load_local(f), row=2, field="chosen", needles=("expected a string, got a JSON number",
                                                                  "{role, content} messages"))


# --------------------------------------------------------------------------- splits


def rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "chosen": f" {tag} yes {i}", "rejected": f" {tag} no {i}"}
            for i in range(n)]


def test_train_and_test_files_are_splits_and_probes_come_from_train(tmp_path):
    # test.jsonl sorts first by name: it used to be read as train rows, and `selection: first` probed it
    write(tmp_path / "test.jsonl", rows("te", 3))
    write(tmp_path / "train.jsonl", rows("tr", 5))
    write(tmp_path / "validation.jsonl", rows("va", 2))
    with collect_split_notes() as notes:
        df = load_preferences(DataSource("local", path=str(tmp_path)))
    assert dict(df.group_by("split").len().iter_rows()) == {"train": 5, "test": 5}
    assert df.filter(pl.col("split") == "test")["example_id"].to_list() == [
        "validation-0", "validation-1", "test-0", "test-1", "test-2"]
    assert df.filter(pl.col("split") == "train")["example_id"].to_list() == [f"train-{i}" for i in range(5)]
    assert notes == ["train.jsonl → train (5 rows)",
                     "validation.jsonl → test (2 rows); its name says validation: held out as test (ldpipe has "
                     "train and test)",
                     "test.jsonl → test (3 rows)"]
    built = build_probe_set(df, ProbeRecipe(n_examples=3, selection="first", types=("chosen", "irr_test")))
    assert built.probes["example_id"].unique(maintain_order=True).to_list() == ["train-0", "train-1", "train-2"]
    assert set(built.probes.filter(pl.col("response_type") == "chosen")["prompt"]) == {
        f"tr question {i}?" for i in range(3)}
    irr = built.probes.filter(pl.col("response_type") == "irr_test")["response"].to_list()
    assert irr and all(" te " in r or " va " in r for r in irr)   # y_test drawn from the held-out files
    assert load_preferences(DataSource("local", path=str(tmp_path), split="test")).height == 5


def test_folder_split_names_follow_datasets(tmp_path):
    """Names `datasets` reads as splits: train_*/*_test/dev/train/ folders; no keyword at all: every file train."""
    write(tmp_path / "a" / "my_train.jsonl", rows("a", 2))
    write(tmp_path / "a" / "dev.jsonl", rows("b", 1))
    write(tmp_path / "a" / "prefs_test.jsonl", rows("c", 1))
    df = load_local(tmp_path / "a", splits=("train", "test"))
    assert df.select("example_id", "split").rows() == [("my_train-0", "train"), ("my_train-1", "train"),
                                                      ("dev-0", "test"), ("prefs_test-0", "test")]
    write(tmp_path / "b" / "train" / "part-0.jsonl", rows("a", 1))
    write(tmp_path / "b" / "test" / "part-0.jsonl", rows("b", 1))
    write(tmp_path / "b" / "test" / ".hidden.jsonl", rows("h", 1))   # hidden: left out, as by datasets
    df = load_local(tmp_path / "b", splits=("train", "test"), columns={})
    assert df["example_id"].to_list() == ["train/part-0-0", "test/part-0-0"]
    assert df["split"].to_list() == ["train", "test"] and df["prompt"].to_list() == ["a question 0?", "b question 0?"]
    write(tmp_path / "c" / "prefs.jsonl", rows("a", 1))
    write(tmp_path / "c" / "more.jsonl", rows("b", 1))
    assert set(load_local(tmp_path / "c", splits=("train", "test"))["split"]) == {"train"}
    # a split column wins over the file name
    write(tmp_path / "d" / "train.jsonl", [{**r, "split": "test"} for r in rows("a", 2)])
    with collect_split_notes() as notes:
        assert load_local(tmp_path / "d", splits=("train", "test"))["split"].to_list() == ["test", "test"]
    assert notes == ["train.jsonl → test (2 rows); by its split column (its name says train)"]


@pytest.mark.parametrize("names, needle", [
    (["train.jsonl", "test.jsonl", "notes.jsonl"], "notes.jsonl has no split in its name"),
    (["train.jsonl", "train_test.jsonl"], "train_test.jsonl matches the splits"),
    (["data/train_prefs-00000-of-00001.parquet", "data/train_sft-00000-of-00001.parquet"], "several train splits"),
    (["data/train-00000-of-00001.parquet", "data/random-00000-of-00001.parquet"], "split 'random'"),
])
def test_folder_names_that_would_lose_or_double_rows(tmp_path, names, needle):
    for n in names:
        write(tmp_path / n, rows(Path(n).stem, 1))
    with pytest.raises(LdpipeError, match=needle.replace("(", r"\(")):
        load_local(tmp_path)


def test_split_column_values_are_normalised_or_named(tmp_path):
    """Issue 22: 10 train, 6 validation, 4 Test rows used to become 10 train rows and nothing else."""
    values = ["train"] * 5 + ["TRAIN"] * 5 + ["validation"] * 6 + ["Test"] * 4
    f = write(tmp_path / "x.jsonl", [{**r, "split": v} for r, v in zip(rows("q", 20), values)])
    with collect_split_notes() as notes:
        df = load_local(f, splits=("train", "test"))
    assert dict(df.group_by("split").len().iter_rows()) == {"train": 10, "test": 10}
    assert notes == ["x.jsonl → train (10 rows), test (10 rows); by its split column; 5 rows 'TRAIN' read as "
                     "train; 6 rows 'validation' read as test; 4 rows 'Test' read as test"]
    f = write(tmp_path / "y.jsonl", [{**r, "split": v} for r, v in zip(rows("q", 3), ["train", "test", "holdout"])])
    expect(lambda: load_local(f), row=3, field="split", needles=("split 'holdout' (1 row(s)) is not a split",))


def test_check_says_which_file_became_which_split(tmp_path, monkeypatch):
    from ldpipe.preflight import check_experiment
    from ldpipe.spec import ExperimentSpec

    write(tmp_path / "pairs" / "train.jsonl", rows("tr", 6))
    write(tmp_path / "pairs" / "test.jsonl", rows("te", 2))
    monkeypatch.setenv("LDPIPE_PROJECT_DIR", str(tmp_path))
    spec = ExperimentSpec.model_validate({"name": "mine", "dataset": {"kind": "local", "path": "pairs"},
                                          "probes": {"n_examples": 2, "selection": "first"},
                                          "runs": [{"name": "sft", "algo": "sft", "batch_size": 2}]})
    rep = check_experiment(spec)
    assert rep.errors == [], rep.errors
    i = next(i for i, x in enumerate(rep.lines) if x.startswith("dataset local"))
    assert "splits {'test': 2, 'train': 6}" in rep.lines[i]
    assert rep.lines[i + 1: i + 3] == ["  train.jsonl → train (6 rows)", "  test.jsonl → test (2 rows)"]


def test_implicit_transcript_prompt_ends_at_its_reply_cue(tmp_path):
    """HH's own jsonl (chosen/rejected transcripts only): TRL's character-wise shared start runs into replies that
    begin alike ("Rom" of Rome/Roma); the prompt ends at its last "Assistant:" instead, the shared letters go back to
    both replies."""
    f = write(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Capital of Italy?\n\nAssistant: Rome is the capital.",
         "rejected": "\n\nHuman: Capital of Italy?\n\nAssistant: Roma, I think."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}])
    rows = load_local(f).select("prompt", "chosen", "rejected").rows()
    assert rows == [("\n\nHuman: Capital of Italy?\n\nAssistant:", " Rome is the capital.", " Roma, I think."),
                    ("\n\nHuman: Hi\n\nAssistant:", " Hello there.", " Go away.")]
