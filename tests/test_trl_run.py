"""`trainer: trl` and `lora:` in a run declaration, through `ldpipe run` as a user starts it, and their validation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from pydantic import ValidationError

from ldpipe.spec import ExperimentSpec, RunSpec

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[1]
LDPIPE = str(Path(sys.executable).parent / "ldpipe")
RUNS = """runs:
  - {name: sft, algo: sft, n_train: 8, epochs: 2, batch_size: 4, eval_every: 2}
  - {name: sft_trl, algo: sft, trainer: trl, n_train: 8, epochs: 2, batch_size: 4, eval_every: 2}
  - {name: sft_lora, algo: sft, trainer: trl, lora: {r: 8}, n_train: 8, epochs: 2, batch_size: 4, eval_every: 2}
  - {name: dpo_lora, algo: dpo, trainer: trl, lora: {r: 8}, start_from: sft_lora, n_train: 8, epochs: 1,
     batch_size: 2, eval_every: 1}
"""


def test_trl_validation_names_the_key():
    with pytest.raises(ValidationError, match="trainer 'trl' does not support pairs"):
        RunSpec(name="x", algo="dpo", trainer="trl", pairs="on_policy")
    with pytest.raises(ValidationError, match="trainer 'trl' does not support snapshot_every"):
        RunSpec(name="x", trainer="trl", snapshot_every=5)
    with pytest.raises(ValidationError, match="lora must equal its start_from run 'a'"):
        ExperimentSpec.model_validate({"name": "e", "runs": [{"name": "a", "lora": {"r": 8}},
                                                             {"name": "b", "algo": "dpo", "start_from": "a",
                                                              "lora": {"r": 4}}]})
    # the new keys at their defaults leave every config hash as it was
    spec = ExperimentSpec.model_validate({"name": "e", "runs": [{"name": "a"}]})
    same = ExperimentSpec.model_validate({"name": "e", "runs": [{"name": "a", "trainer": "ldpipe", "lora": None}]})
    other = ExperimentSpec.model_validate({"name": "e", "runs": [{"name": "a", "trainer": "trl"}]})
    assert spec.run_config_hash(spec.runs[0]) == same.run_config_hash(same.runs[0]) != other.run_config_hash(
        other.runs[0])


@pytest.mark.slow
def test_trl_and_lora_runs_through_ldpipe_run(tmp_path):
    proj = tmp_path / "p"
    (proj / "assets").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "own_data" / "qa.jsonl", proj / "qa.jsonl")
    decl = (REPO / "examples" / "own_data" / "assets" / "own_qa.yaml").read_text()
    decl = decl[:decl.index("runs:")] + RUNS + "\n" + decl[decl.index("generation_analysis"):]
    (proj / "assets" / "own_qa.yaml").write_text(decl)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    r = subprocess.run([LDPIPE, "run", "--preset", "smoke", "--device", "cpu"], capture_output=True, text=True,
                       cwd=proj, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    home = proj / ".ldpipe"
    con = duckdb.connect(str(home / "catalog.duckdb"), read_only=True)
    for view in ("trajectories", "learning_curves", "influence", "squeezing"):
        runs = {x for (x,) in con.sql(f"select distinct run_id from {view}").fetchall()}
        assert {"own_qa.sft_lora", "own_qa.dpo_lora"} <= runs, (view, runs)
    # LoRA checkpoints hold the adapter and name their base; influence was over the adapter only
    for run in ("sft_lora", "dpo_lora"):
        final = home / "models" / "own_qa" / "runs" / run / "final"
        meta = json.loads((final / "ldpipe.json").read_text())
        assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
        assert meta["trainer"] == "trl" and 0 < meta["trainable_parameters"] < meta["total_parameters"] / 10
        assert (final / meta["lora_base"]).resolve() == next((home / "models").glob("base-*")).resolve()
    import dagster as dg

    with dg.DagsterInstance.from_config(str(proj / ".dagster_home")) as inst:
        (rec,) = inst.fetch_materializations(dg.AssetKey(["own_qa", "influence_matrix"]), limit=1).records
        params = rec.asset_materialization.metadata["parameters"].value
    assert params["sft_lora"].startswith("the LoRA adapter only (r=8") and params["sft"] == "all parameters"
    # TRL and ldpipe SFT from the same base, same settings: the same direction on every probe type that moved
    # (a type whose mean moved less than 5% of the largest move in both runs has no direction to compare)
    d = dict(((run, t), v) for run, t, v in con.sql(
        "select run_id, response_type, mean_delta from learning_curves "
        "qualify step = max(step) over (partition by run_id)").fetchall())
    types = {t for (_, t) in d}
    scale = {run: max(abs(d[(run, t)]) for t in types) for run in ("own_qa.sft", "own_qa.sft_trl")}
    compared = [t for t in types if abs(d[("own_qa.sft", t)]) > 0.05 * scale["own_qa.sft"]
                or abs(d[("own_qa.sft_trl", t)]) > 0.05 * scale["own_qa.sft_trl"]]
    assert len(compared) >= len(types) - 1, (sorted(types), compared)
    for t in compared:
        assert (d[("own_qa.sft", t)] > 0) == (d[("own_qa.sft_trl", t)] > 0), (t, d[("own_qa.sft", t)],
                                                                             d[("own_qa.sft_trl", t)])
    con.close()
