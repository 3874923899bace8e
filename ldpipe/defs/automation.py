"""Automation: a nightly schedule over the declared runs, and a sensor on declarations and base checkpoints.

Both start STOPPED (turn them on in the UI: Automation). The sensor's cursor is a JSON map of what it last saw:
per declaration file its content hash, experiment and run config hashes; per experiment with a local pretrained
base model a fingerprint of the checkpoint's files. Its first tick only records that baseline (turning it on
launches nothing); later ticks request the affected experiment's assets:
- a new or modified YAML: the runs whose config hash changed (and everything downstream of them), or the whole
  experiment when its dataset, probes or model changed;
- a local base checkpoint (`model.kind: pretrained`, `name_or_path` a directory) that appears or changes: the
  whole experiment. The built-in base model is the pipeline's own output, so it is not watched.
A YAML declaring an experiment the loaded code location does not know yet needs a code location reload
(UI: Deployment → Reload); the sensor logs that and fires after the reload.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg

from ldpipe.defs.common import CATALOG_KEY, declarations_dir
from ldpipe.errors import SpecError
from ldpipe.paths import project_dir
from ldpipe.spec import ExperimentSpec, config_hash, load_experiment

NIGHTLY_CRON = "0 3 * * *"


def automation(specs: list[ExperimentSpec]) -> tuple[list, list]:
    """(schedules, sensors) for the declared experiments."""
    runs = dg.AssetSelection.keys(*[dg.AssetKey([s.name, f"run_{r.name}"]) for s in specs if s.run_by_default
                                    for r in s.runs])
    nightly = dg.ScheduleDefinition(
        name="nightly_declared_runs", cron_schedule=NIGHTLY_CRON, execution_timezone="UTC",
        target=runs.upstream() | runs.downstream(), default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Every night at 03:00 UTC: materialize every declared run of the experiments run by default, "
                    "what it needs (dataset, probe set, base model, parent runs) and what reads it (catalog, curves, "
                    "analyses).")
    return [nightly], [_declarations_sensor(specs)]


def _declarations_sensor(specs: list[ExperimentSpec]):
    known = {s.name: s for s in specs}

    @dg.sensor(name="declarations_changed", target=dg.AssetSelection.all(), minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Requests an experiment's affected assets when its YAML in assets/ is new or modified, "
                           "or when its local base checkpoint appears or changes. First tick: baseline only.")
    def declarations_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        first = not context.cursor
        before = json.loads(context.cursor) if context.cursor else {}
        seen_decl, seen_base = before.get("decl", {}), before.get("base", {})
        decl, base, requests = {}, {}, []
        graph = context.repository_def.asset_graph if context.repository_def is not None else None

        for path in _declaration_files():
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            prev = seen_decl.get(path.name)
            if prev and prev["sha"] == sha:
                decl[path.name] = prev
                continue
            try:
                spec = load_experiment(path)
            except SpecError as e:  # recorded: the fixed file has another hash and fires then
                context.log.warning(f"{path.name}: not requesting anything, the declaration is invalid: {e}")
                decl[path.name] = {"sha": sha, "exp": None}
                continue
            if spec.name not in known:
                context.log.warning(f"{path.name} declares experiment {spec.name!r}, unknown to the loaded code "
                                    "location: reload it (UI: Deployment → Reload) to get its assets")
                continue
            entry = _fingerprint(spec, sha)
            decl[path.name] = entry
            if first:
                continue
            keys = _changed_keys(spec, prev if prev and prev.get("exp") == spec.name else None, entry, graph)
            what = "new" if prev is None else "modified"
            requests.append(dg.RunRequest(run_key=f"{spec.name}:declaration:{sha[:12]}", asset_selection=keys,
                                          tags={"ldpipe/trigger": f"declaration {path.name} {what}"}))

        for spec in specs:
            ckpt = _local_base_checkpoint(spec)
            if ckpt is None:
                continue
            fp = _dir_fingerprint(ckpt)
            base[spec.name] = fp
            if first or fp is None or seen_base.get(spec.name) == fp:
                continue
            requests.append(dg.RunRequest(run_key=f"{spec.name}:base:{fp[:12]}",
                                          asset_selection=_experiment_keys(spec, graph),
                                          tags={"ldpipe/trigger": f"base checkpoint {ckpt} changed"}))

        cursor = json.dumps({"decl": decl, "base": base}, sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        why = "recorded the baseline" if first else "no declaration or base checkpoint changed"
        return dg.SensorResult(skip_reason=why, cursor=cursor)

    return declarations_changed


def _declaration_files() -> list[Path]:
    d = declarations_dir()
    return sorted([*d.glob("*.yaml"), *d.glob("*.yml")]) if d.is_dir() else []


def _fingerprint(spec: ExperimentSpec, sha: str) -> dict:
    return {"sha": sha, "exp": spec.name,
            "inputs": config_hash({"dataset": spec.dataset, "probes": spec.probes_hash_part(), "model": spec.model}),
            "runs": {r.name: spec.run_config_hash(r) for r in spec.runs}}


def _experiment_keys(spec: ExperimentSpec, graph) -> list[dg.AssetKey] | None:
    """The experiment's job (its group and the catalog); None (the sensor's whole target) without a graph."""
    if graph is None:
        return None
    return sorted((dg.AssetSelection.groups(spec.name) | dg.AssetSelection.keys(CATALOG_KEY)).resolve(graph))


def _changed_keys(spec: ExperimentSpec, prev: dict | None, now: dict, graph) -> list[dg.AssetKey] | None:
    """Runs whose config hash changed, plus what is downstream of them within the experiment; the whole
    experiment when the inputs (dataset, probes, model) changed or nothing earlier is known."""
    if graph is None or prev is None or prev.get("inputs") != now["inputs"]:
        return _experiment_keys(spec, graph)
    changed = [dg.AssetKey([spec.name, f"run_{n}"]) for n, h in now["runs"].items() if prev["runs"].get(n) != h]
    changed = [k for k in changed if graph.has(k)]  # a run added since the last reload has no asset yet
    if not changed:
        return _experiment_keys(spec, graph)   # e.g. a description or a removed run: refresh the experiment
    scope = set(_experiment_keys(spec, graph))
    return sorted(set(dg.AssetSelection.keys(*changed).downstream().resolve(graph)) & scope)


def _local_base_checkpoint(spec: ExperimentSpec) -> Path | None:
    if spec.model.kind != "pretrained":
        return None
    p = Path(spec.model.name_or_path).expanduser()
    p = p if p.is_absolute() else project_dir() / p
    # A hub id ("org/name") is not watched until a local directory of that name exists; an explicit path
    # ("./x", "/x", "~/x") is watched from the start, so that its appearing fires.
    return p if p.exists() or spec.model.name_or_path.startswith((".", "/", "~")) else None


def _dir_fingerprint(path: Path) -> str | None:
    """Hash of (name, size, mtime) of the checkpoint's files; None while it does not exist."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
