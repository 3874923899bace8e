"""`dg launch` (the Dagster CLI) materializes the SFT -> DPO and extend-SFT -> DPO chains into DuckDB."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldpipe.store.catalog import query

REPO = Path(__file__).resolve().parents[1]

CHAINS_YAML = """
name: chains
dataset:
  kind: synthetic
  synthetic: {seed: 1, n_entities: 16, n_train: 24, n_test: 8, corpus_docs: 200}
probes: {n_examples: 4, selection: random, seed: 0, max_prompt_tokens: 48, max_response_tokens: 40,
         generation: {max_new_tokens: 8}}
model:
  kind: builtin
  vocab_size: 400
  architecture: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}
  pretrain: {steps: 10, batch_size: 8, seq_len: 64, lr: 3.0e-3, warmup: 2}
runs:
  - {name: sft, algo: sft, epochs: 1, batch_size: 8, lr: 2.0e-3, eval_every: 2}
  - {name: dpo, algo: dpo, start_from: sft, epochs: 1, batch_size: 8, lr: 1.0e-3, eval_every: 2}
  - {name: extend_sft, algo: sft, supervise: chosen+rejected, epochs: 0.5, batch_size: 8, lr: 2.0e-3, eval_every: 2}
  - {name: extend_dpo, algo: dpo, start_from: extend_sft, epochs: 1, batch_size: 8, lr: 1.0e-3, eval_every: 2}
influence: {enabled: false}
generation_analysis: {enabled: false}
"""


@pytest.mark.slow
def test_dg_launch_runs_both_chains_into_duckdb(tmp_path):
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "assets" / "chains.yaml").write_text(CHAINS_YAML)
    (proj / "sql").symlink_to(REPO / "sql")
    (tmp_path / "dagster_home").mkdir()
    env = {**os.environ, "LDPIPE_PROJECT_DIR": str(proj), "LDPIPE_HOME": str(proj / ".ldpipe"),
           "LDPIPE_ASSETS_DIR": str(proj / "assets"), "DAGSTER_HOME": str(tmp_path / "dagster_home"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    dg = str(Path(sys.executable).parent / "dg")
    proc = subprocess.run([dg, "launch", "--job", "chains_pipeline"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curves = query(proj / ".ldpipe" / "catalog.duckdb",
                   "select run_id, phase, count(distinct step) as evals from learning_curves group by 1, 2 order by 1")
    assert curves.rows() == [("chains.dpo", "dpo", 3), ("chains.extend_dpo", "dpo", 3),
                             ("chains.extend_sft", "sft", 3), ("chains.sft", "sft", 3)]
    # the DPO runs started from their parents' checkpoints: their first evaluation equals the parent's last
    first_last = query(proj / ".ldpipe" / "catalog.duckdb", """
        select a.response_type, a.mean_logp as parent_last, b.mean_logp as child_first
        from learning_curves a join learning_curves b using (response_type)
        where a.run_id = 'chains.sft' and a.step = (select max(step) from learning_curves where run_id = 'chains.sft')
          and b.run_id = 'chains.dpo' and b.step = 0""")
    assert first_last.height > 0
    assert (first_last["parent_last"] - first_last["child_first"]).abs().max() < 1e-4
