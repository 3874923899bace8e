"""The nightly schedule and the declarations sensor, evaluated for real against built definitions."""
import datetime as dt
import json

import dagster as dg

from ldpipe.defs.experiments import build_defs
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.spec import load_experiments

DPO = "  - {name: dpo, algo: dpo, start_from: sft, epochs: 0.5, batch_size: 8, lr: 1.0e-3, eval_every: 2}\n"


def _defs(project):
    decl = project / "assets" / "tiny.yaml"
    if "name: dpo" not in decl.read_text():
        decl.write_text(decl.read_text() + DPO)
    return _with_resources(build_defs(load_experiments(project / "assets")))


def _with_resources(defs):  # as the code location merges them (ldpipe/defs/resources.py)
    return dg.Definitions.merge(defs, dg.Definitions(resources={"ldpipe_home": LdpipeHome(), "compute": Compute()}))


def _tick(defs, cursor):
    sensor = defs.get_sensor_def("declarations_changed")
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        data = sensor.evaluate_tick(ctx)
    return data.run_requests or [], data.cursor, data.skip_message


def _keys(req) -> set[str]:
    return {k.to_user_string() for k in req.asset_selection}


def test_nightly_schedule_materializes_every_declared_run(tiny_project):
    defs = _defs(tiny_project)
    schedule = defs.get_schedule_def("nightly_declared_runs")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == "0 3 * * *"
    ctx = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.timezone.utc))
    data = schedule.evaluate_tick(ctx)
    assert len(data.run_requests) == 1
    job = defs.resolve_job_def(schedule.job_name)
    selected = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    # the runs, what they need, and what reads them
    assert {"tiny/run_sft", "tiny/run_dpo", "tiny/dataset", "tiny/probe_set", "tiny/base_model", "catalog",
            "tiny/paper_directions", "tiny/learning_curves"} <= selected


def test_declarations_sensor_fires_on_changes_only(tiny_project):
    defs = _defs(tiny_project)
    assert defs.get_sensor_def("declarations_changed").default_status == dg.DefaultSensorStatus.STOPPED
    decl = tiny_project / "assets" / "tiny.yaml"

    # first tick: baseline only; second tick without change: nothing
    reqs, cursor, skip = _tick(defs, None)
    assert reqs == [] and "baseline" in skip
    assert set(json.loads(cursor)["decl"]) == {"tiny.yaml"}
    reqs, cursor2, skip = _tick(defs, cursor)
    assert reqs == [] and cursor2 == cursor and "no declaration" in skip

    # a run's hyperparameter changes: that run and what is downstream of it, not its parent or the inputs
    decl.write_text(decl.read_text().replace("lr: 1.0e-3", "lr: 5.0e-4"))
    reqs, cursor3, _ = _tick(defs, cursor2)
    assert len(reqs) == 1
    keys = _keys(reqs[0])
    assert {"tiny/run_dpo", "tiny/paper_directions", "catalog"} <= keys
    assert not keys & {"tiny/run_sft", "tiny/base_model", "tiny/dataset"}
    assert reqs[0].run_key.startswith("tiny:declaration:")
    reqs, cursor4, _ = _tick(defs, cursor3)  # the same change is not requested twice
    assert reqs == [] and cursor4 == cursor3

    # the model changes: the whole experiment (base model and every run)
    decl.write_text(decl.read_text().replace("steps: 15,", "steps: 16,"))
    reqs, cursor5, _ = _tick(defs, cursor4)
    assert len(reqs) == 1 and {"tiny/base_model", "tiny/run_sft", "tiny/run_dpo", "tiny/dataset"} <= _keys(reqs[0])

    # an invalid edit requests nothing; fixing it fires
    good = decl.read_text()
    decl.write_text(good.replace("algo: dpo", "algo: dpoo"))
    reqs, cursor6, _ = _tick(defs, cursor5)
    assert reqs == []
    decl.write_text(good.replace("lr: 5.0e-4", "lr: 2.0e-4"))
    reqs, cursor7, _ = _tick(defs, cursor6)
    assert len(reqs) == 1 and "tiny/run_dpo" in _keys(reqs[0])

    # a new declaration of an experiment the loaded definitions do not know: nothing until a reload
    (tiny_project / "assets" / "other.yaml").write_text(good.replace("name: tiny", "name: other"))
    reqs, cursor8, _ = _tick(defs, cursor7)
    assert reqs == [] and "other.yaml" not in json.loads(cursor8)["decl"]
    reloaded = _with_resources(build_defs(load_experiments(tiny_project / "assets")))
    reqs, cursor9, _ = _tick(reloaded, cursor8)
    assert len(reqs) == 1 and "other/run_sft" in _keys(reqs[0]) and not any(
        k.startswith("tiny/") for k in _keys(reqs[0]))
    assert _tick(reloaded, cursor9)[0] == []


def test_sensor_fires_when_a_local_base_checkpoint_appears_or_changes(tiny_project):
    decl = tiny_project / "assets" / "tiny.yaml"
    text = decl.read_text()
    model_block = text[text.index("model:"):text.index("runs:")]
    decl.write_text(text.replace(model_block, "model: {kind: pretrained, name_or_path: ./ckpt/base}\n"))
    defs = _with_resources(build_defs(load_experiments(tiny_project / "assets")))

    reqs, cursor, _ = _tick(defs, None)           # baseline: no checkpoint yet
    assert reqs == [] and json.loads(cursor)["base"] == {"tiny": None}
    ckpt = tiny_project / "ckpt" / "base"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    reqs, cursor, _ = _tick(defs, cursor)         # it appears
    assert len(reqs) == 1 and reqs[0].run_key.startswith("tiny:base:")
    assert {"tiny/base_model", "tiny/run_sft"} <= _keys(reqs[0])
    assert _tick(defs, cursor)[0] == []           # unchanged
    (ckpt / "model.safetensors").write_bytes(b"0" * 16)
    reqs, cursor, _ = _tick(defs, cursor)         # it changes
    assert len(reqs) == 1 and reqs[0].tags["ldpipe/trigger"].startswith("base checkpoint")
