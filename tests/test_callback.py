"""ldpipe's tracking callback inside real TRL runs (no Dagster): the rows it writes, exactly once across a resume,
and nothing from a non-main process."""
from __future__ import annotations

import warnings
from pathlib import Path

import polars as pl
import pytest

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer  # noqa: E402
from ldpipe.model.scoring import encode_probes, score_probes  # noqa: E402
from ldpipe.probes.build import ProbeRecipe, build_probe_set  # noqa: E402
from ldpipe.schema import TRAJECTORY_SCHEMA  # noqa: E402
from ldpipe.store.shards import Store  # noqa: E402
from ldpipe.training.callback import ProbeTrackingCallback  # noqa: E402
from ldpipe.training.trl_run import fix_resume_weights  # noqa: E402

ROWS = [(f"q{i}", "train" if i < 12 else "test", f"Question {i}: what is item {i}?",
         f" Item {i} is a thing of colour {['red', 'blue', 'green'][i % 3]}.", f" No idea about {i}.")
        for i in range(16)]
PREFS = pl.DataFrame(ROWS, schema=["example_id", "split", "prompt", "chosen", "rejected"], orient="row").with_columns(
    pl.lit("test").alias("source"))


def _setup(seed: int = 0):
    tok = train_tokenizer([*PREFS["prompt"], *PREFS["chosen"], *PREFS["rejected"]], vocab_size=300)
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed),
                        vocab_size=len(tok))
    probes = build_probe_set(PREFS, ProbeRecipe(n_examples=4, selection="first",
                                                types=("chosen", "rejected", "irr_test", "random_permute"))).probes
    train = PREFS.filter(pl.col("split") == "train")
    data = Dataset.from_dict({"prompt": train["prompt"].to_list(), "completion": train["chosen"].to_list()})
    return tok, model, probes, data


def _config(out: Path, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
                save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False, use_cpu=True,
                disable_tqdm=True, seed=0, data_seed=0)
    return SFTConfig(**{**base, **kw})


def test_callback_writes_ldpipe_rows_from_a_trl_run(tmp_path):
    tok, model, probes, data = _setup()
    store = Store(tmp_path / "store")
    cb = ProbeTrackingCallback(probes, store, run_id="t.sft", config_hash="abc", phase="sft", eval_every=2)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, callbacks=[cb],
                         args=_config(tmp_path / "out"))
    trainer.train()
    traj = store.read("trajectories", run_id="t.sft")
    assert traj.columns == list(TRAJECTORY_SCHEMA)
    assert sorted(traj["step"].unique().to_list()) == [0, 2, 4, 6]
    assert set(traj["config_hash"]) == {"abc"} and set(traj["phase"]) == {"sft"}
    assert traj.filter(pl.col("step") == 0).height == probes.height
    # the last evaluation is ldpipe's scorer on the trained model (the callback scored it in eval mode)
    model.eval()
    again = score_probes(model, encode_probes(tok, probes, max_prompt_tokens=96, max_response_tokens=64))
    last = traj.filter(pl.col("step") == 6).sort("example_id", "response_type")
    assert last["logp_sum"].to_list() == pytest.approx(
        again.sort("example_id", "response_type")["logp_sum"].to_list(), abs=1e-5)
    # SFT on y+ raised y+
    first = traj.filter(pl.col("step") == 0)
    mean = lambda f, t: f.filter(pl.col("response_type") == t)["logp_sum"].mean()  # noqa: E731
    assert mean(last, "chosen") > mean(first, "chosen") + 1.0
    metrics = store.read("train_metrics", run_id="t.sft").sort("step")
    assert metrics["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert metrics["loss"].is_not_null().all() and metrics["grad_norm"].is_not_null().all()
    assert store.manifest_path("run_id", "t.sft").is_file()


class _Stop(TrainerCallback):
    """Interrupts training after `at` steps (a killed run), once the step's checkpoint is saved."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_resumed_run_writes_every_evaluation_exactly_once(tmp_path):
    # uninterrupted reference
    tok, model, probes, data = _setup()
    ref = Store(tmp_path / "ref")
    SFTTrainer(model=model, processing_class=tok, train_dataset=data,
               callbacks=[ProbeTrackingCallback(probes, ref, run_id="r", eval_every=3)],
               args=_config(tmp_path / "o1", save_strategy="steps", save_steps=2)).train()
    # the same run killed after step 4 (evaluated at 0 and 3; checkpoint at 4), then resumed from step 4
    tok, model, probes, data = _setup()
    store = Store(tmp_path / "store")
    out = tmp_path / "o2"
    with pytest.raises(KeyboardInterrupt):
        SFTTrainer(model=model, processing_class=tok, train_dataset=data,
                   callbacks=[ProbeTrackingCallback(probes, store, run_id="r", eval_every=3), _Stop(4)],
                   args=_config(out, save_strategy="steps", save_steps=2)).train()
    # a stale row after the checkpoint (as a crash between an evaluation and the next checkpoint leaves one)
    stale = store.read("trajectories", run_id="r").filter(pl.col("step") == 3).with_columns(pl.lit(5).alias("step"))
    store.write_shard("trajectories", stale, partition={"run_id": "r"}, name="step-0000005", schema=TRAJECTORY_SCHEMA)
    tok, model, probes, data = _setup()
    cb = ProbeTrackingCallback(probes, store, run_id="r", eval_every=3)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, callbacks=[cb],
                         args=_config(out, save_strategy="steps", save_steps=2))
    fix_resume_weights(trainer)   # else transformers 5 resumes GPT-NeoX without its output layer (trl_run docstring)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert cb.scored == [6]                              # 0 and 3 were not redone
    got = store.read("trajectories", run_id="r").sort("step", "example_id", "response_type")
    want = ref.read("trajectories", run_id="r").sort("step", "example_id", "response_type")
    assert got["step"].unique().to_list() == [0, 3, 6]   # the stale step-5 row is gone; each step once
    assert got.height == want.height
    assert got["logp_sum"].to_list() == pytest.approx(want["logp_sum"].to_list(), abs=1e-4)
    metrics = store.read("train_metrics", run_id="r")
    assert sorted(metrics["step"].to_list()) == [1, 2, 3, 4, 5, 6]


def test_only_the_main_process_writes(tmp_path):
    tok, model, probes, _ = _setup()
    store = Store(tmp_path / "store")
    cb = ProbeTrackingCallback(probes, store, run_id="w", eval_every=1, tokenizer=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    other = TrainerState(is_world_process_zero=False)
    for hook in (cb.on_train_begin, cb.on_step_end, cb.on_train_end):
        hook(args, other, TrainerControl(), model=model)
    cb.on_log(args, other, TrainerControl(), logs={"loss": 1.0})
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))
    main = TrainerState(is_world_process_zero=True)
    cb.on_train_begin(args, main, TrainerControl(), model=model)
    assert store.read("trajectories", run_id="w").height == probes.height


def test_the_documented_example_runs(tmp_path):
    """examples/trl_callback.py as the README runs it: TRL's SFTTrainer + the callback, no Dagster, store under
    ./.ldpipe; it prints each type's mean log-probability at steps 0 and 6."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "examples" / "trl_callback.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    store = Store(tmp_path / ".ldpipe" / "trl_example" / "store")
    traj = store.read("trajectories", run_id="example.sft")
    assert sorted(traj["step"].unique().to_list()) == [0, 2, 4, 6]
    assert "chosen" in r.stdout and "random_permute" in r.stdout and "mean_logp" in r.stdout


@pytest.mark.slow
def test_own_dpo_script_on_conversational_data_tracks_trls_own_logps(tmp_path):
    """examples/trl_dpo_chat.py: a user's DPOTrainer on TRL-format conversational data (read by TRL as it is, and by
    ldpipe for the probe set) with a chat-templated tokenizer. The callback's tracked y+ log-prob after k steps
    equals TRL's own logps/chosen of step k+1 (same weights, same batch) to 1e-4 nats at every step."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "examples" / "trl_dpo_chat.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "probes scored as the model's chat template" in r.stdout
    diffs = [float(d) for d in re.findall(r"\|diff\| ([0-9.e+-]+)", r.stdout)]
    assert len(diffs) == 4 and max(diffs) < 1e-4, r.stdout[-2000:]
    traj = Store(tmp_path / ".ldpipe" / "trl_dpo_chat" / "store").read("trajectories", run_id="example.dpo")
    assert sorted(traj["step"].unique().to_list()) == [0, 1, 2, 3, 4]
