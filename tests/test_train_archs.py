"""Both trainers on the architectures users bring (tests/tiny_models.py): ldpipe's loop and TRL's, full weights and
LoRA, and an interrupted ldpipe run resumed, each tracking probes scored by the tokenization contract."""
from __future__ import annotations

import math

import polars as pl
import pytest

import tiny_models as tm
from ldpipe.model.checkpoints import load_tokenizer
from ldpipe.model.scoring import encode_probes
from ldpipe.spec import LoraSpec, RunSpec
from ldpipe.store.shards import Store
from ldpipe.training import resume
from ldpipe.training.loop import run_training

PROMPTS = [f"\n\nHuman: Question {i}: what is {i} plus {i}?\n\nAssistant:" for i in range(4)]
CHOSEN = [f" It is {2 * i}." for i in range(4)]
REJECTED = [f" Maybe {i + 7}, I think." for i in range(4)]
PROBES = pl.DataFrame([(f"e{i}", t, PROMPTS[i], y) for i in range(2)
                       for t, y in (("chosen", CHOSEN[i]), ("rejected", REJECTED[i]))],
                      schema=["example_id", "response_type", "prompt", "response"], orient="row")
LIMITS = dict(max_prompt_tokens=48, max_response_tokens=16)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-archs-train")


def _train(run: RunSpec, path, tmp_path, name: str, log=lambda m: None):
    examples = list(zip(PROMPTS, CHOSEN)) if run.algo == "sft" else list(zip(PROMPTS, CHOSEN, REJECTED))
    store = Store(tmp_path / "store")
    common = dict(run_id=name, config_hash="h-" + name, model_path=path, examples=examples, store=store,
                  out_dir=tmp_path / name, device="cpu", log=log, **LIMITS)
    if run.trainer == "trl":
        from ldpipe.training.trl_run import run_trl

        result = run_trl(run, probes=PROBES, **common)
    else:
        result = run_training(run, probes=encode_probes(load_tokenizer(path), PROBES, **LIMITS), **common)
    return result, store.read("trajectories", run_id=name).sort("step", "example_id", "response_type")


def _assert_tracked(result, traj, steps: int):
    assert result.steps == steps and math.isfinite(result.final_loss)
    assert sorted(traj["step"].unique().to_list()) == list(range(0, steps + 1, 2))
    assert traj.height == 4 * (steps // 2 + 1) and traj["logp_sum"].is_finite().all()
    first, last = (traj.filter(pl.col("step") == s).sort("example_id", "response_type") for s in (0, steps))
    return last["logp_sum"] - first["logp_sum"]


@pytest.mark.slow
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_both_trainers_full_and_lora(family, root, tmp_path):
    """ldpipe DPO and SFT+LoRA, TRL SFT and DPO+LoRA: 4 steps each from the same checkpoint, every probe scored at
    steps 0, 2, 4, finite; SFT raises y+ (lr 5e-3 on 4 examples); a LoRA run's adapter trained and the base kept."""
    path = tm.checkpoint(family, root)
    base = dict(n_train=4, epochs=2, batch_size=2, eval_every=2, lr=5e-3, warmup_steps=0)
    runs = {"ldpipe_dpo": RunSpec(name="d", algo="dpo", **base),
            "ldpipe_sft_lora": RunSpec(name="s", algo="sft", lora=LoraSpec(r=4), **base),
            "trl_sft": RunSpec(name="ts", algo="sft", trainer="trl", **base),
            "trl_dpo_lora": RunSpec(name="td", algo="dpo", trainer="trl", lora=LoraSpec(r=4), **base)}
    for name, run in runs.items():
        result, traj = _train(run, path, tmp_path, name)
        delta = _assert_tracked(result, traj, 4)
        assert delta.abs().max() > 0, (family, name)          # training moved the tracked log-probs
        if run.algo == "sft":
            chosen = traj.filter((pl.col("response_type") == "chosen") & pl.col("step").is_in([0, 4]))
            by_step = chosen.group_by("step").agg(pl.col("logp_sum").mean()).sort("step")["logp_sum"]
            assert by_step[1] > by_step[0], (family, name, by_step.to_list())
        if run.lora is not None:
            assert (result.checkpoint / "adapter_config.json").is_file(), (family, name)


@pytest.mark.slow
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_ldpipe_run_interrupted_and_resumed_matches_one_run(family, root, tmp_path):
    """An ldpipe DPO run stopped after step 4's evaluation resumes from its step-2... checkpoint and writes exactly the
    rows of an uninterrupted run, bit for bit."""
    path = tm.checkpoint(family, root)
    run = RunSpec(name="d", algo="dpo", n_train=4, epochs=3, batch_size=2, eval_every=2, checkpoint_every=2, lr=5e-3,
                  warmup_steps=0)
    _, clean = _train(run, path, tmp_path / "clean", "r")

    def stop(msg: str) -> None:
        if msg.startswith("[r] eval step 4/"):
            raise Interrupt(msg)

    with pytest.raises(Interrupt):
        _train(run, path, tmp_path / "cut", "r", log=stop)
    assert resume.latest(tmp_path / "cut" / "r") is not None
    result, again = _train(run, path, tmp_path / "cut", "r")
    assert result.resumed_from is not None and result.resumed_from <= 4
    assert again.drop("epoch").equals(clean.drop("epoch")), family
