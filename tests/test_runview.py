"""The terminal view of `ldpipe run`, fed with the event log of a real (tiny) Dagster run."""

import io
import os

import dagster as dg
from rich.console import Console

from ldpipe.errors import DataValidationError
from ldpipe.runview import RunView, check_line, check_verdict, output_to_log, root_cause


@dg.asset
def counts(context: dg.AssetExecutionContext) -> None:
    for i in (3, 7):
        context.log.info(f"[x] step {i}/10 loss 0.5")
    context.log.warning("[x] WARNING: only 12 tokens in the corpus")


@dg.asset(deps=[counts])
def reads_file() -> None:
    raise DataValidationError("/data/qa.jsonl", "expected a string, got a JSON number (42)", row=3, field="good")


@dg.asset(deps=[reads_file])
def downstream() -> None:
    pass


@dg.asset(check_specs=[dg.AssetCheckSpec("big_enough", asset="measured")])
def measured():
    yield dg.MaterializeResult()
    yield dg.AssetCheckResult(check_name="big_enough", passed=False,
                              metadata={"delta": -1.23456, "n": 5, "threshold": 0.8, "note": "y+ fell",
                                        "long": "x" * 200, "empty_by_type": {"chosen_initial": 6},
                                        "big": {str(i): i for i in range(40)}})


def test_steps_progress_warnings_and_root_cause():
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([counts, reads_file, downstream], instance=instance, raise_on_error=False)
        buf = io.StringIO()
        view = RunView(Console(file=buf, width=200))
        # replay up to the progress messages of `counts`: its bar knows the total and the step reached
        records = instance.get_records_for_run(result.run_id).records
        upto = next(i for i, r in enumerate(records) if "step 7/10" in (r.event_log_entry.user_message or ""))
        for r in records[:upto + 1]:
            view.show(r.event_log_entry)
        (task,) = view._progress.tasks
        assert task.description == "counts" and (task.completed, task.total) == (7, 10)
        for r in records[upto + 1:]:
            view.show(r.event_log_entry)
        view.close()
    out = buf.getvalue()
    assert "done  counts" in out
    assert "! counts: [x] only 12 tokens in the corpus" in out
    # the user's error, not Dagster's wrapper or a traceback
    assert view.failures == {"reads_file": "/data/qa.jsonl, row 3, field 'good': expected a string, got a JSON "
                                           "number (42)"}
    assert "Traceback" not in out and "DagsterExecutionStepExecutionError" not in out
    assert "skip  1 step(s) downstream of a failure: downstream" in out
    assert "\n\n" not in out       # off a terminal the (undrawn) progress display leaves no blank line


def test_failed_check_prints_its_numbers_in_one_line():
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([measured], instance=instance, raise_on_error=False)
    (ev,) = result.get_asset_check_evaluations()
    line = check_line(ev)
    # a small JSON value (what failed, per type) is shown; a large one is left to the UI
    assert line == ("FAIL measured:big_enough  (delta=-1.235, n=5, threshold=0.8, note=y+ fell, "
                    'empty_by_type={"chosen_initial":6})')


@dg.asset(check_specs=[dg.AssetCheckSpec("agrees", asset="compared")])
def compared():
    yield dg.MaterializeResult()
    yield dg.AssetCheckResult(check_name="agrees", passed=True,
                              metadata={"skipped": "not measured: influence.methods ['exact'] has no 'naive'",
                                        "threshold": 0.9, "entries_compared": 0})


def test_a_check_with_nothing_to_measure_prints_as_skip_with_its_reason():
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([compared], instance=instance, raise_on_error=False)
    (ev,) = result.get_asset_check_evaluations()
    assert check_verdict(ev) == "SKIP"
    assert check_line(ev) == "SKIP compared:agrees  (not measured: influence.methods ['exact'] has no 'naive')"


def test_root_cause_keeps_the_class_of_a_foreign_error():
    class E:
        def __init__(self, message, cause=None):
            self.message, self.cause = message, cause

    assert root_cause(E("dagster wrapper", E("FileNotFoundError: [Errno 2] x.bin\n"))) == \
        "FileNotFoundError: [Errno 2] x.bin"
    assert root_cause(E("w", E("ldpipe.errors.LdpipeError: base model missing\n  more"))) == "base model missing"


def test_output_to_log_sends_both_streams_to_the_file_and_restores_them(tmp_path):
    log = tmp_path / "logs" / "run.log"
    before = os.fstat(1).st_ino, os.fstat(2).st_ino
    with output_to_log(log) as terminal:
        os.write(1, b"to stdout\n")
        os.write(2, b"to stderr\n")
        assert os.fstat(terminal).st_ino == before[0]
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before
    assert log.read_text() == "to stdout\nto stderr\n"
