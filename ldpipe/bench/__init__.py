"""`ldpipe bench <name>`: speed and memory measured side by side in one run, reported as ratios.

Absolute times are context only: benchmarks are not tests, and nothing here asserts a
wall-clock threshold. Each benchmark returns a report dict
{benchmark, title, context, columns, results: [row dicts], goal, goal_met, notes}
that is printed as a table and as one JSON line (and optionally written to a file).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

NAMES = ("scoring", "tracking", "influence", "demo", "sql", "memory")


def _registry() -> dict[str, Callable[..., dict]]:
    # imported lazily: each benchmark pulls in different heavy modules
    from ldpipe.bench import demo, influence, memory, scoring, sql, tracking

    return {"scoring": scoring.bench_scoring, "tracking": tracking.bench_tracking,
            "influence": influence.bench_influence, "demo": demo.bench_demo, "sql": sql.bench_sql,
            "memory": memory.bench_memory}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cpus, {gpu}, torch {torch.__version__}"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3g}"
        return f"{v:.1e}"
    return str(v)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ldpipe bench {report['benchmark']}: {report.get('title', '')}")
    cols = report.get("columns") or list(report["results"][0])
    for c in cols:
        t.add_column(c.replace("_", " "), justify="left" if c in ("method", "workload", "phase") else "right")
    for r in report["results"]:
        t.add_row(*(_fmt(r.get(c, "")) for c in cols))
    con = Console(width=140)
    con.print(t)
    if report.get("notes"):
        print(report["notes"])
    if report.get("goal"):
        met = report.get("goal_met")
        verdict = "MET" if met else ("NOT MET" if met is not None else "not measured")
        print(f"goal: {report['goal']}: {verdict}")
    print(f"machine: {report.get('machine', '')}")


def run_bench(name: str, *, json_out: Path | None = None, **kwargs) -> dict:
    registry = _registry()
    if name not in registry:
        from ldpipe.errors import LdpipeError

        raise LdpipeError(f"unknown benchmark {name!r}; choose one of {list(registry)}")
    report = registry[name](**{k: v for k, v in kwargs.items() if v is not None})
    report.setdefault("machine", machine())
    print_report(report)
    if json_out:
        from ldpipe.atomic import write_json

        write_json(report, json_out)
    print(json.dumps(report, default=str))
    return report
