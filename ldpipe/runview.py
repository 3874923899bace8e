"""What `ldpipe run` shows in the terminal while Dagster works: one line per finished step, a progress bar with
ETA for the steps that report "step N/M", warnings, and for a failed step its root cause. Dagster's full event
log (DEBUG included), library warnings and loading bars go to a log file in the ldpipe home instead.

Why hand-written: Dagster's console logger prints every event (~400 lines for the default run, a third DEBUG);
this view reads the same events from the instance's event log, so nothing is lost, only kept out of sight.
"""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_PROGRESS = re.compile(r"(?:^|\s)step (\d+)/(\d+)\b")


def step_name(step_key: str) -> str:
    """own_qa__run_sft -> own_qa/run_sft (the asset key as the UI shows it)."""
    return step_key.replace("__", "/", 1)


def root_cause(error: Any) -> str:
    """The deepest message of a Dagster error chain: the user's error (file, row, field), not Dagster's wrapper."""
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause
    last = messages[-1] if messages else "unknown error"
    first_line = last.splitlines()[0] if last else last
    first_line = re.sub(r"^dagster\._core\.definitions\.events\.Failure: ", "", first_line)   # a Pipes worker's
    # "ldpipe.errors.DataValidationError: x.jsonl, row 3, field 'chosen': ..." -> the message itself
    m = re.match(r"^[\w.]*(Error|Exception)\w*: (.*)$", first_line)
    return m.group(2) if m and first_line.startswith(("ldpipe.", "LdpipeError", "DataValidationError",
                                                      "SpecError")) else first_line


def check_line(evaluation: Any) -> str:
    """A check's verdict and its measured numbers in one line; a failed check's own one-line verdict (its
    description, e.g. "y_init empty for 24 of 24 prompts: the base model ends its reply at once") first."""
    nums = []
    for k, v in (evaluation.metadata or {}).items():
        raw = getattr(v, "value", v)
        if isinstance(raw, bool):
            nums.append(f"{k}={raw}")
        elif isinstance(raw, float):
            nums.append(f"{k}={raw:.4g}")
        elif isinstance(raw, int):
            nums.append(f"{k}={raw}")
        elif isinstance(raw, str) and len(raw) <= 60 and "\n" not in raw:
            nums.append(f"{k}={raw}")
        elif isinstance(raw, (dict, list)):   # e.g. a count per response type: often what failed
            text = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
            if len(text) <= 80:
                nums.append(f"{k}={text}")
    head = f"{check_verdict(evaluation)} {evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
    raw = (evaluation.metadata or {}).get("skipped")
    skipped = getattr(raw, "value", raw)
    if skipped is not None:    # not measured (e.g. a method that was not run): why, not numbers
        return f"{head}  ({skipped})"
    if evaluation.passed:
        return head
    said = getattr(evaluation, "description", None)
    said = said.strip().splitlines()[0] if isinstance(said, str) and said.strip() else ""
    return head + (f"  {said}" if said else "") + (f"  ({', '.join(nums)})" if nums else "")


def check_verdict(evaluation: Any) -> str:
    """PASS, FAIL, or SKIP for a check that had nothing to measure (it passes with metadata `skipped`: why)."""
    if evaluation.passed and "skipped" in (evaluation.metadata or {}):
        return "SKIP"
    return "PASS" if evaluation.passed else "FAIL"


@dataclass
class RunView:
    """Follows one run's event log and renders it on `console` (a rich Console on the real terminal)."""

    console: Any
    cursor: str | None = None
    failures: dict[str, str] = field(default_factory=dict)   # step key -> root cause
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)          # steps not run because an upstream step failed
    _tasks: dict[str, Any] = field(default_factory=dict)
    _progress: Any = None

    def __post_init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self.console, transient=True,
                                  # off a terminal (a file, a pipe) nothing is drawn, and stopping would add a blank line
                                  disable=not self.console.is_terminal)
        self._progress.start()

    def poll(self, instance: Any, run_id: str) -> None:
        conn = instance.get_records_for_run(run_id, cursor=self.cursor, limit=500)
        self.cursor = conn.cursor
        for rec in conn.records:
            self.show(rec.event_log_entry)
        if conn.has_more:
            self.poll(instance, run_id)

    def show(self, entry: Any) -> None:
        ev, step = entry.dagster_event, entry.step_key
        if ev is None:                         # a log message from a step (or a Pipes worker)
            msg = entry.user_message or ""
            m = _PROGRESS.search(msg)
            if step in self._tasks and m:
                self._progress.update(self._tasks[step], completed=int(m.group(1)), total=int(m.group(2)))
            if msg.startswith("Dependencies for step"):   # Dagster skips what a failed step feeds
                self.skipped.append(step)
                return
            if entry.level >= logging.WARNING or "WARNING" in msg:
                self.console.print(f"  ! {step_name(step) if step else 'run'}: {msg.replace('WARNING: ', '')}",
                                   markup=False, highlight=False)
            return
        kind = ev.event_type_value
        if kind == "STEP_START":
            self._tasks[step] = self._progress.add_task(step_name(step), total=None)
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"):
            if step in self._tasks:
                self._progress.remove_task(self._tasks.pop(step))
            if kind == "STEP_SUCCESS":
                secs = ev.event_specific_data.duration_ms / 1000
                self.console.print(f"done  {step_name(step)}  {secs:.1f}s", markup=False, highlight=False)
                self.done.append(step)
            elif kind == "STEP_FAILURE":
                cause = root_cause(ev.event_specific_data.error)
                self.failures[step] = cause
                self.console.print(f"FAIL  {step_name(step)}: {cause}", markup=False, highlight=False)
            else:
                self.skipped.append(step)

    def close(self) -> None:
        self._progress.stop()
        if self.skipped:
            names = sorted({step_name(s) for s in self.skipped if s})
            self.console.print(f"skip  {len(names)} step(s) downstream of a failure: {', '.join(names)}",
                               markup=False, highlight=False)


@contextmanager
def output_to_log(log_path: Path) -> Iterator[int]:
    """Send this process's stdout and stderr (Dagster's console log, warnings, loading bars, child processes)
    to `log_path`; yields a file descriptor of the real terminal's stdout. Restores both on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.dup(saved_out)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for f in (saved_out, saved_err, fd, terminal):
            os.close(f)
