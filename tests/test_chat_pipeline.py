"""A newcomer's project end to end: a train.jsonl + test.jsonl folder of TRL-format conversational data and a
chat-templated Qwen2-style checkpoint, through `ldpipe check` and `ldpipe run --preset smoke`; the tracked step-0
log-probabilities equal a plain forward of the template-rendered conversation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

import tiny_models as tm

REPO = Path(__file__).resolve().parents[1]
LDPIPE = str(Path(sys.executable).parent / "ldpipe")
DECL = """name: chat
dataset: {kind: local, path: data, columns: {example_id: id}}
probes: {n_examples: 4, selection: first, max_prompt_tokens: 256, max_response_tokens: 200}
model: {kind: pretrained, name_or_path: ./qwen-tiny}
runs:
  - {name: sft, algo: sft, n_train: 8, epochs: 1, batch_size: 4, eval_every: 1}
  - {name: dpo, algo: dpo, trainer: trl, start_from: sft, n_train: 8, epochs: 1, batch_size: 4, eval_every: 1}
generation_analysis: {n_prompts: 3, max_new_tokens: 8}
influence: {n_train: 3, n_probe_prompts: 2, rank: 8}
"""


@pytest.mark.slow
def test_conversational_folder_with_a_templated_model_end_to_end(tmp_path):
    proj = tmp_path / "p"
    (proj / "assets").mkdir(parents=True)
    (proj / "data").mkdir()
    shutil.copytree(tm.checkpoint("qwen2", tmp_path / "build"), proj / "qwen-tiny")
    rows = [json.loads(line) for line in (REPO / "examples" / "own_data" / "chat_prefs.jsonl").open()]
    for name, part in (("train.jsonl", rows[:14]), ("test.jsonl", rows[14:])):   # the file name is the split
        (proj / "data" / name).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                                                  for r in part))
    (proj / "assets" / "chat.yaml").write_text(DECL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

    chk = subprocess.run([LDPIPE, "check"], capture_output=True, text=True, cwd=proj, env=env, timeout=300)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert "train.jsonl → train (14 rows); conversational" in chk.stdout
    assert "test.jsonl → test (6 rows); conversational" in chk.stdout
    assert "scoring format (probes.chat_template: auto): the model's chat template" in chk.stdout
    assert "no probe prompt or response is cut" in chk.stdout

    r = subprocess.run([LDPIPE, "run", "--preset", "smoke", "--device", "cpu"], capture_output=True, text=True,
                       cwd=proj, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    con = duckdb.connect(str(proj / ".ldpipe" / "catalog.duckdb"), read_only=True)
    got = con.sql("select example_id, response_type, logp_sum from trajectories where run_id = 'chat.sft' "
                  "and step = 0 and response_type in ('chosen', 'rejected')").fetchall()
    for view in ("learning_curves", "influence", "squeezing"):
        assert con.execute(f"select count(*) from {view} where run_id = 'chat.dpo'").fetchone()[0] > 0, view
    con.close()
    # independent: the raw messages of the data file, rendered by the tokenizer's template, one plain forward each
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(proj / "qwen-tiny")
    model = AutoModelForCausalLM.from_pretrained(proj / "qwen-tiny").eval()
    by_id = {r["id"]: r for r in rows}
    assert len(got) == 8
    for eid, rtype, logp in got:
        raw = by_id[eid]
        prompt = tok.apply_chat_template(raw["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"]
        full = tok.apply_chat_template(raw["prompt"] + raw[rtype], tokenize=True)["input_ids"]
        assert full[:len(prompt)] == prompt
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), -1)
        want = float(sum(lp[k - 1, full[k]] for k in range(len(prompt), len(full))))
        assert abs(logp - want) < 1e-4, (eid, rtype, logp, want)
