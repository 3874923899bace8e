"""`ldpipe` command line: run the pipeline, open the UI, query results, validate declarations."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ldpipe.errors import LdpipeError


def _cmd_run(args: argparse.Namespace) -> int:
    import dagster as dg

    from ldpipe.defs.experiments import build_defs, declarations_dir
    from ldpipe.defs.resources import Compute, LdpipeHome
    from ldpipe.instance import ensure_dagster_home, step_durations
    from ldpipe.paths import Paths, project_dir
    from ldpipe.spec import load_experiments

    home = ensure_dagster_home()
    specs = load_experiments(declarations_dir())
    if args.experiment:
        wanted = set(args.experiment)
        unknown = wanted - {s.name for s in specs}
        if unknown:
            raise LdpipeError(f"unknown experiment(s) {sorted(unknown)}; declared: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]
    else:
        studies = [s.name for s in specs if not s.run_by_default]
        specs = [s for s in specs if s.run_by_default]
        for name in studies:
            print(f"skipping experiment {name!r} (run_by_default: false); run it with `ldpipe run -e {name}`")
    if not specs:
        raise LdpipeError(f"no experiments declared in {declarations_dir()}")
    defs = build_defs(specs)
    assets = list(defs.assets or [])
    run_config = None
    if args.preset:
        from ldpipe.defs.training import preset_run_config

        run_config = {"ops": {k: v for s in specs for k, v in preset_run_config(s, args.preset)["ops"].items()}}
    import uuid

    from rich.console import Console

    from ldpipe.runguard import my_tags, recover_dead_runs, run_guarded
    from ldpipe.runview import RunView, check_line, check_verdict, output_to_log

    paths = Paths.default()
    log_path = paths.home / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    print(f"ldpipe run: {', '.join(s.name for s in specs)}; Dagster's full event log: {log_path}", flush=True)
    with dg.DagsterInstance.get() as instance, dg.DagsterInstance.from_ref(instance.get_ref()) as watcher:
        recover_dead_runs(instance, log=say)     # a killed earlier run would hold the gpu pool forever
        invocation = uuid.uuid4().hex
        tags = {"ldpipe/launched_by": "ldpipe run", **my_tags(invocation)}
        with output_to_log(log_path) as terminal:
            with open(os.dup(terminal), "w", buffering=1) as term:
                view = RunView(Console(file=term, soft_wrap=True))
                try:
                    # in a worker thread, so that SIGINT/SIGTERM reach this thread's handlers even while a step
                    # waits for a pool (Dagster only records them there); `watcher`, a second instance object,
                    # serves this thread
                    result = run_guarded(lambda: dg.materialize(
                        assets, instance=instance,
                        resources={"ldpipe_home": LdpipeHome(), "compute": Compute(device=args.device)},
                        run_config=run_config, tags=tags, raise_on_error=False), instance=watcher,
                        invocation=invocation, log=say, poll_s=0.5, terminal_fd=terminal,
                        on_poll=lambda run: view.poll(watcher, run.run_id))
                finally:
                    view.close()
        steps = step_durations(instance, result.run_id)
    wall = time.perf_counter() - t0
    print()
    checks = result.get_asset_check_evaluations()
    failed_checks = [c for c in checks if not c.passed]
    if not result.success:
        causes = view.failures or {"run": "the run failed before any step (see the log)"}
        print(f"Full event log: {log_path}", file=sys.stderr)
        print(f"ldpipe run FAILED after {wall:.0f}s (Dagster run {result.run_id}); {len(causes)} step(s) failed:",
              file=sys.stderr)
        for step, cause in causes.items():
            print(f"  {step.replace('__', '/', 1)}: {cause}", file=sys.stderr)
        return 1
    print(f"ldpipe run finished in {wall:.0f}s (Dagster run {result.run_id}, history in {home})")
    if steps:
        print("Slowest steps: " + ", ".join(f"{k} {v:.0f}s" for k, v in steps[:5]))
    skipped = sum(1 for c in checks if check_verdict(c) == "SKIP")
    print(f"Checks: {len(checks) - len(failed_checks) - skipped} PASS, {len(failed_checks)} FAIL"
          + (f", {skipped} SKIP (not measured)" if skipped else ""))
    for c in checks:
        print(f"  {check_line(c)}")
    print(f"Results:\n  Parquet store   {paths.store}\n  DuckDB catalog  {paths.catalog}\n  plots           "
          f"{paths.plots}\n  checkpoints     {paths.models}\n  event log       {log_path}")
    print("Next (from any shell):")
    for line in next_commands(paths):
        print(f"  {line}")
    if project_dir() != Path.cwd():
        print(f"(project directory: {project_dir()})")
    return 0


def next_commands(paths) -> list[str]:
    """Commands that run as printed from a fresh shell: full paths, no activated venv, no duckdb CLI needed."""
    import json
    import shlex

    exe = Path(sys.executable)
    ldpipe = exe.parent / "ldpipe"
    cmd = shlex.quote(str(ldpipe)) if ldpipe.exists() else f"{shlex.quote(str(exe))} -m ldpipe.cli"
    env = "" if os.environ.get("LDPIPE_HOME") is None else f"LDPIPE_HOME={shlex.quote(str(paths.home))} "
    # each run's own last step: a global max(step) would drop every run that took fewer steps
    query = ("select run_id, response_type, step, round(mean_delta, 3) as mean_delta from learning_curves "
             "qualify step = max(step) over (partition by run_id) order by run_id, response_type")
    py = (f"import duckdb; print(duckdb.connect({json.dumps(str(paths.catalog))}, read_only=True)"
          '.sql("select table_name from information_schema.tables"))')
    return [f"{env}{cmd} ui    # Dagster UI on http://127.0.0.1:3000 (asset graph, plots, history)",
            f"{env}{cmd} sql {shlex.quote(query)}",
            f"{shlex.quote(str(exe))} -c {shlex.quote(py)}    # the catalog from Python, read-only"]


def _cmd_ui(args: argparse.Namespace) -> int:
    from ldpipe.instance import ensure_dagster_home
    from ldpipe.paths import project_dir

    home = ensure_dagster_home()
    if (home / "storage").is_dir():   # runs a killed UI session left STARTED would hold the gpu pool
        import dagster as dg
        from dagster._core.instance.ref import InstanceRef

        from ldpipe.runguard import recover_dead_runs

        try:
            with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
                recover_dead_runs(instance, log=lambda m: print(m, file=sys.stderr, flush=True))
        except Exception as e:  # noqa: BLE001 (the UI must start even if the history cannot be read)
            print(f"ldpipe ui: could not check the run history for dead runs: {e}", file=sys.stderr)
    print(f"DAGSTER_HOME={home}; UI on http://{args.host}:{args.port}", flush=True)
    proj = project_dir()
    os.chdir(proj)
    if _is_dg_project(proj):
        cmd = [str(_tool("dg", "dagster-dg-cli")), "dev", "-h", args.host, "-p", str(args.port)]
    else:   # a user's own project (assets/ only): ldpipe's code location, reading this project's declarations
        os.environ["LDPIPE_PROJECT_DIR"] = str(proj)
        cmd = [str(_tool("dagster", "dagster")), "dev", "-m", "ldpipe.definitions", "-h", args.host,
               "-p", str(args.port)]
    os.environ["PATH"] = f"{Path(cmd[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _is_dg_project(proj: Path) -> bool:
    """Whether `dg dev` can run in `proj` (a dg.toml, or a pyproject.toml with a [tool.dg] table: ldpipe's own)."""
    pyproject = proj / "pyproject.toml"
    return (proj / "dg.toml").is_file() or (pyproject.is_file() and "[tool.dg]" in pyproject.read_text())


def _tool(name: str, package: str) -> Path:
    """A command installed next to this interpreter (the venv need not be activated), else on PATH."""
    found = Path(sys.executable).parent / name
    if found.exists():
        return found
    import shutil

    on_path = shutil.which(name)
    if not on_path:
        raise LdpipeError(f"the `{name}` command ({package}) is not installed; run `pip install -e .` in ldpipe")
    return Path(on_path)


def _cmd_check(args: argparse.Namespace) -> int:
    from ldpipe.defs.experiments import declarations_dir
    from ldpipe.preflight import check_experiment
    from ldpipe.spec import load_experiments

    specs = load_experiments(Path(args.dir) if args.dir else declarations_dir())
    if args.experiment:
        unknown = set(args.experiment) - {s.name for s in specs}
        if unknown:
            raise LdpipeError(f"unknown experiment(s) {sorted(unknown)}; declared: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in set(args.experiment)]
    errors: list[str] = []
    for s in specs:
        runs = ", ".join(f"{r.name} ({r.algo}, {spec_hash})" for r, spec_hash in
                         ((r, s.run_config_hash(r)) for r in s.runs))
        print(f"{s.name}: dataset={s.dataset.kind} model={s.model.kind} runs=[{runs}]", flush=True)
        if args.declarations_only:
            continue
        rep = check_experiment(s)
        for line in rep.lines:
            print(f"  ok    {line}", flush=True)
        for w in rep.warnings:
            print(f"  warn  {w}", flush=True)
        for e in rep.errors:
            print(f"  ERROR {e}", file=sys.stderr, flush=True)
        errors += [f"{s.name}: {e}" for e in rep.errors]
    if errors:
        print(f"{len(errors)} problem(s) would stop the run; the first: {errors[0]}", file=sys.stderr)
        return 2
    print(f"{len(specs)} experiment(s) OK")
    return _check_store() if args.store else 0


def _check_store() -> int:
    """Every shard fits its table's schema, and every finished run's shards are all there, unchanged, alone."""
    from ldpipe.paths import Paths
    from ldpipe.store.catalog import check_store
    from ldpipe.store.shards import Store

    paths = Paths.default()
    if not paths.home.is_dir():
        print(f"store: the ldpipe home {paths.home} does not exist (set LDPIPE_HOME, or run something first): "
              "nothing to check", file=sys.stderr)
        return 2
    store = Store(paths.store)
    try:
        problems, counts = check_store(store)
    except Exception as e:  # noqa: BLE001 (a check never ends in a traceback)
        print(f"store {store.root}: the check failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    verdict = f"{len(problems)} problem(s)" if problems else "OK"
    old = (f" ({counts['no_digest']} of them by row count only: no digest recorded, manifests written before "
           "digests existed)") if counts.get("no_digest") else ""
    print(f"store {store.root}: {verdict}; {counts['shards']} shard(s), {counts['shards_verified']} checked against "
          f"the manifests of {counts['manifests']} finished run(s){old}", file=sys.stderr if problems else sys.stdout)
    return 2 if problems else 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from ldpipe.store.sqlcli import run_sql

    return run_sql(args)


def _cmd_catalog(args: argparse.Namespace) -> int:
    from ldpipe import pipeline
    from ldpipe.paths import Paths, project_dir

    paths = Paths.default()
    from ldpipe.paths import sql_dirs

    dirs = sql_dirs(Path(args.sql_dir) if args.sql_dir else project_dir() / "sql")
    info = pipeline.refresh(paths, dirs[-1])
    for path, why in info.get("left_out", {}).items():
        print(f"  warn  left out {path}: {why}", file=sys.stderr)
    n = sum(info["tables"].values())
    print(f"catalog {info['path']}: {len(info['views'])} views over {n} shard(s) in {paths.store} "
          f"(sql views from {' and '.join(str(d) for d in dirs if d.is_dir()) or 'no sql/ folder'})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ldpipe.bench import run_bench

    kwargs = {"quick": args.quick, "threads": args.threads}
    if args.name in ("scoring", "tracking", "influence", "memory"):
        kwargs.update(device=args.device, arch=args.arch)
    if args.name in ("scoring", "tracking"):
        kwargs.update(autocast=args.autocast)
    if args.name == "scoring":
        kwargs.update(probes_path=args.probes, n_prompts=args.prompts)
    elif args.name == "tracking":
        kwargs.update(n_prompts=args.prompts)
    elif args.name == "influence":
        kwargs.update(model_path=args.model)
    elif args.name == "sql":
        kwargs.update(rows=args.rows)
    elif args.name == "demo":
        kwargs.update(keep_home=args.keep_home)
    run_bench(args.name, json_out=Path(args.json) if args.json else None, **kwargs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="materialize the declared experiments (default: all) end to end")
    r.add_argument("--experiment", "-e", action="append", help="experiment name (repeatable)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--preset", choices=["smoke", "full"], help="launch every run with this preset "
                   "(smoke: a few steps on 16 prompts, probes every 2 steps; full: as declared)")
    r.set_defaults(func=_cmd_run)

    u = sub.add_parser("ui", help="start the Dagster UI (dg dev) bound to 127.0.0.1")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=3000)
    u.set_defaults(func=_cmd_ui)

    c = sub.add_parser("check", help="validate what a run needs: declarations, data files (every row), corpus, "
                       "model files, run sizes, probe types; in seconds, nothing trained")
    c.add_argument("--dir", help="declarations directory (default: <project>/assets)")
    c.add_argument("--experiment", "-e", action="append", help="check only this experiment (repeatable)")
    c.add_argument("--declarations-only", action="store_true", help="parse the YAML only; do not read the data, "
                   "the corpus or the model files")
    c.add_argument("--store", action="store_true", help="also check the store of the ldpipe home: shards that do "
                   "not fit their table, and missing, changed or extra shards against what finished runs wrote")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("bench", help="speed and memory benchmarks, measured side by side in one run (ratios)")
    b.add_argument("name", choices=["scoring", "tracking", "influence", "demo", "sql", "memory"])
    b.add_argument("--quick", action="store_true", help="small size for a CPU")
    b.add_argument("--probes", help="scoring: a reference-format probe file instead of the built-in default")
    b.add_argument("--prompts", type=int, help="scoring/tracking: number of probe prompts")
    b.add_argument("--model", help="influence: a checkpoint directory (default: random weights, default size)")
    b.add_argument("--rows", type=int, help="sql: trajectory rows to generate (default 10M; --quick 1M)")
    b.add_argument("--keep-home", help="demo: run into this empty ldpipe home and keep it (default: a temp dir)")
    b.add_argument("--arch", help="scoring/tracking/influence/memory: model shape with random weights: "
                   "default (the default experiment's), 160m or 410m (Pythia GPT-NeoX shapes)")
    b.add_argument("--device", help="scoring/tracking/influence/memory: auto (CUDA when present) | cpu | cuda | cuda:N")
    b.add_argument("--autocast", choices=["fp32", "bf16"], help="scoring/tracking: bf16 autocast of the forwards "
                   "(default fp32)")
    b.add_argument("--threads", type=int, help="torch/DuckDB threads (default: scoring tries 1 and 2 and keeps "
                   "each method's faster; others min(2, cores))")
    b.add_argument("--json", help="also write the report to this JSON file")
    b.set_defaults(func=_cmd_bench)

    cat = sub.add_parser("catalog", help="rebuild the DuckDB catalog of the ldpipe home (e.g. after moving it)")
    cat_sub = cat.add_subparsers(dest="catalog_command", required=True)
    refresh = cat_sub.add_parser("refresh", help="views over <LDPIPE_HOME>/store and the project's sql/*.sql")
    refresh.add_argument("--sql-dir", help="directory of the SQL views (default: <project>/sql)")
    refresh.set_defaults(func=_cmd_catalog)

    from ldpipe.store.sqlcli import add_sql_arguments

    s = sub.add_parser("sql", help="run a read-only SQL query against the DuckDB catalog")
    add_sql_arguments(s)
    s.set_defaults(func=_cmd_sql)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LdpipeError as e:
        print(f"ldpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
