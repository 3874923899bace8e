"""Keeps `ldpipe run` stoppable and the Dagster instance free of dead runs.

Why this exists: a run executed in-process (`dg.materialize`) claims its steps' pool slots (the `gpu` pool, limit
1) in the instance database. If the process is killed (kill -9, a closed terminal, an OOM kill), the run stays
STARTED and keeps its claim, and the next run waits for that slot forever. While a step waits for a pool, Dagster
only records SIGINT/SIGTERM (it never acts on them there), so Ctrl-C could not end the wait either.

So `ldpipe run`:
- first finds runs of this instance whose process is gone (the PID recorded with the run, or the PID in its
  events, no longer running the process that started it), marks them failed and frees their pool claims;
- runs the materialization in a worker thread, so the main thread keeps its own SIGINT/SIGTERM handlers: on a
  signal it stops the child processes (training workers), waits a few seconds for the run to end by itself, else
  marks it failed and frees its claims, and exits 130 (SIGINT) or 143 (SIGTERM);
- says at INFO what it waits for while a step of its run is blocked by a pool.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ldpipe.atomic import process_gone

ACTIVE = ("NOT_STARTED", "STARTING", "STARTED", "CANCELING")
TAG_PID, TAG_PID_START, TAG_HOST, TAG_INVOCATION = "ldpipe/pid", "ldpipe/pid_start", "ldpipe/host", "ldpipe/invocation"
STOP_GRACE_S = 10.0      # after a signal: how long the run may take to end by itself
CHILD_GRACE_S = 5.0      # after SIGINT to the children: how long before SIGKILL
Log = Callable[[str], None]


# ----------------------------------------------------------------------------------- processes

def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def process_start_time(pid: int) -> float | None:
    """Epoch seconds at which process `pid` started (Linux /proc), None when unknown or not running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    boot = _boot_time()
    if fields[0] == "Z" or boot is None:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Is `pid` running, and (when `started` is known) is it still the process that started then (not a reused
    PID)?"""
    if process_gone(pid):
        return False
    try:   # a zombie (killed, not yet reaped by its parent) is not running
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    now_start = process_start_time(pid)
    if now_start is None:
        return Path(f"/proc/{pid}").exists() if Path("/proc").is_dir() else True
    return started is None or abs(now_start - started) < 2.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def _is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ldpipe.training.worker" in cmd or b"torch.distributed" in cmd


def stop_workers(pid: int, grace_s: float = CHILD_GRACE_S) -> list[int]:
    """SIGINT to the training workers below `pid` (they stop cleanly on it), SIGKILL to those left after
    `grace_s`. Returns the workers it stopped."""
    workers = [k for k in descendants(pid) if _is_worker(k)]
    _signal_all(workers, signal.SIGINT)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(pid_alive(k) for k in workers):
        time.sleep(0.1)
    _signal_all([k for k in workers if pid_alive(k)], signal.SIGKILL)
    return workers


def _signal_all(pids: list[int], sig: int) -> None:
    for k in pids:
        try:
            os.kill(k, sig)
        except OSError:
            pass


# ----------------------------------------------------------------------------------- the instance

def my_tags(invocation: str) -> dict[str, str]:
    pid = os.getpid()
    start = process_start_time(pid)
    return {TAG_PID: str(pid), TAG_PID_START: f"{start:.2f}" if start else "", TAG_HOST: socket.gethostname(),
            TAG_INVOCATION: invocation}


def _run_process(instance, run) -> tuple[int, float | None] | None:
    """(pid, start time) of the process executing `run`: the PID ldpipe tagged it with, else the PID of its
    latest event (in-process and run-worker executions both log from the executing process)."""
    tags = run.tags or {}
    if tags.get(TAG_HOST) not in (None, socket.gethostname()):
        return None                                    # another machine: not ours to judge
    if tags.get(TAG_PID):
        start = tags.get(TAG_PID_START)
        return int(tags[TAG_PID]), float(start) if start else None
    from dagster import DagsterEventType

    kinds = {DagsterEventType.STEP_START, DagsterEventType.ENGINE_EVENT, DagsterEventType.RUN_START}
    for rec in instance.get_records_for_run(run.run_id, of_type=kinds, ascending=False, limit=5).records:
        event = rec.event_log_entry.dagster_event
        if event is not None and event.pid:
            return int(event.pid), None
    return None


def recover_dead_runs(instance, log: Log = print) -> list[str]:
    """Runs of `instance` still active whose process is gone: marked FAILURE with the reason, their pool claims
    freed. Returns their run ids."""
    import dagster as dg

    statuses = [dg.DagsterRunStatus[s] for s in ACTIVE]
    recovered = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses)):
        proc = _run_process(instance, run)
        if proc is None or pid_alive(*proc):
            continue
        pid = proc[0]
        msg = (f"the process that ran it (pid {pid}) is gone (killed or crashed); marked failed by ldpipe so its "
               "pool claims are freed")
        instance.report_run_failed(run, msg)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(f"ldpipe: run {run.run_id} ({run.job_name}) was still STARTED but its process (pid {pid}) is gone: "
            "marked it failed and freed its pool claims")
        recovered.append(run.run_id)
    return recovered


def pool_wait(instance, run_id: str) -> str | None:
    """What a run's blocked steps wait for: "pool 'gpu' (limit 1), held by run <id> step <key>", or None."""
    storage = instance.event_log_storage
    waits = []
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        mine = [p for p in info.pending_steps if p.run_id == run_id and p.assigned_timestamp is None]
        if not mine:
            continue
        holders = ", ".join(f"run {c.run_id[:8]} step {c.step_key}" for c in info.claimed_slots
                            if c.run_id != run_id) or "nobody (a slot frees up shortly)"
        waits.append(f"step {', '.join(p.step_key for p in mine)} waits for pool {key!r} "
                     f"(limit {info.slot_count}), held by {holders}")
    return "; ".join(waits) or None


def _find_run(instance, invocation: str):
    import dagster as dg

    runs = instance.get_runs(filters=dg.RunsFilter(tags={TAG_INVOCATION: invocation}), limit=1)
    return runs[0] if runs else None


# ----------------------------------------------------------------------------------- the guarded run

def run_guarded(fn: Callable[[], Any], *, instance, invocation: str, log: Log = print,
                poll_s: float = 2.0, terminal_fd: int | None = None,
                on_poll: Callable[[Any], None] | None = None) -> Any:
    """`fn()` (a materialization tagged with `invocation`) in a worker thread; the main thread reports pool
    waits and turns SIGINT/SIGTERM into a prompt, clean exit (module docstring). Returns fn's result, or raises
    what it raised. `on_poll(run)` is called after each poll with the run once it exists (and at the end)."""
    box: dict[str, Any] = {}
    # Dagster redirects this process's stdout/stderr into compute-log files while a step runs (a `tail` child
    # mirrors them); messages written to a copy of the original stderr (or the given terminal) reach the terminal
    terminal = os.dup(2 if terminal_fd is None else terminal_fd)

    def say(msg: str) -> None:
        try:
            os.write(terminal, (msg + "\n").encode())
        except OSError:
            log(msg)

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:   # noqa: BLE001 (re-raised in the main thread)
            box["error"] = e

    got: list[int] = []
    previous = {s: signal.signal(s, lambda signo, _f: got.append(signo)) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=target, name="ldpipe-run", daemon=True)
    worker.start()
    last_said, last_time = None, 0.0
    try:
        while worker.is_alive():
            worker.join(timeout=poll_s)
            if got:
                _stop(instance, invocation, got[0], worker, say)   # does not return
            run = _find_run(instance, invocation)
            if run is not None and on_poll is not None:
                on_poll(run)
            said = pool_wait(instance, run.run_id) if run is not None else None
            if said and (said != last_said or time.monotonic() - last_time > 60):
                say(f"ldpipe: waiting: {said}")
                last_said, last_time = said, time.monotonic()
            elif not said:
                last_said = None
        run = _find_run(instance, invocation)
        if run is not None and on_poll is not None:
            on_poll(run)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(terminal)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _stop(instance, invocation: str, signo: int, worker: threading.Thread, say: Log) -> None:
    name = signal.Signals(signo).name
    say(f"ldpipe: {name}: stopping the run (training workers get SIGINT; at most "
        f"{STOP_GRACE_S + CHILD_GRACE_S:.0f} s)")
    workers = stop_workers(os.getpid())
    # a run whose worker was stopped ends by itself (its step fails); one waiting for a pool never would
    worker.join(timeout=STOP_GRACE_S if workers else 1.0)
    run = _find_run(instance, invocation)
    if run is not None:
        fresh = instance.get_run_by_id(run.run_id)
        if fresh is not None and fresh.status.name in ACTIVE:
            instance.report_run_failed(fresh, f"stopped by {name}")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            say(f"ldpipe: run {run.run_id} marked failed (stopped by {name}); its pool claims are freed")
        else:
            say(f"ldpipe: run {run.run_id} ended: {fresh.status.name if fresh else 'unknown'}")
    rest = descendants(os.getpid())          # Dagster's compute-log tails and their watchers: no orphans
    _signal_all(rest, signal.SIGTERM)
    time.sleep(0.2)
    _signal_all([k for k in rest if pid_alive(k)], signal.SIGKILL)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signo)
