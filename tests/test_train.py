"""Real tiny SFT / DPO / IPO runs and run chains through the library (no Dagster)."""
import math

import polars as pl
import pytest
import torch
import yaml
from conftest import TINY_YAML, build_inputs

from ldpipe import pipeline
from ldpipe.errors import LdpipeError, SpecError
from ldpipe.model.checkpoints import load_model_and_tokenizer, read_metadata
from ldpipe.model.scoring import batch_logps, encode_pair
from ldpipe.paths import Paths
from ldpipe.spec import parse_experiment
from ldpipe.store.shards import Store

torch.set_num_threads(1)

RUNS = [
    {"name": "sft", "algo": "sft", "epochs": 1, "batch_size": 8, "lr": 2.0e-3, "eval_every": 2},
    {"name": "dpo", "algo": "dpo", "start_from": "sft", "epochs": 2, "batch_size": 8, "lr": 5.0e-3,
     "warmup_steps": 0, "eval_every": 3},
    {"name": "ipo", "algo": "ipo", "start_from": "dpo", "epochs": 0.25, "batch_size": 8, "lr": 1.0e-3,
     "eval_every": 5},
    {"name": "extend", "algo": "sft", "supervise": "chosen+rejected", "epochs": 0.5, "batch_size": 8,
     "lr": 2.0e-3, "eval_every": 5},
]


def _spec(runs=RUNS, **run_changes):
    data = yaml.safe_load(TINY_YAML)
    # 80 instead of 15 pretraining steps (~2 s): a model that barely saw text lifts y- along with y+
    # under DPO (shared tokens); after some pretraining DPO lowers y-, as in the paper.
    data["model"]["pretrain"]["steps"] = 80
    data["runs"] = [{**r, **run_changes.get(r["name"], {})} for r in runs]
    return parse_experiment(data, source="test")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """The tiny dataset, probe set and base model, built once; then sft -> dpo -> ipo and extend trained."""
    spec = _spec()
    files = build_inputs(spec, tmp_path_factory.mktemp("ldhome"))
    quiet = lambda msg: None  # noqa: E731
    info = {r.name: pipeline.train_run(spec, r, files, device="cpu", log=quiet) for r in spec.runs}
    return spec, files, info


def _table(files, table, run_id):
    return Store(files.paths.store).read(table, run_id=run_id)


def _train_triples(spec, files, tok):
    train = pipeline.load_preferences_file(files).filter(pl.col("split") == "train").sort("example_id")
    lim = dict(max_prompt_tokens=spec.probes.max_prompt_tokens, max_response_tokens=spec.probes.max_response_tokens)
    return [(encode_pair(tok, p, c, **lim), encode_pair(tok, p, r, **lim)[1])
            for p, c, r in train.select("prompt", "chosen", "rejected").iter_rows()]


@torch.no_grad()
def _mean_logps(path, triples):
    model, _ = load_model_and_tokenizer(path, device="cpu")
    lp_c, _ = batch_logps(model, [pc for pc, _ in triples])
    lp_r, _ = batch_logps(model, [(pc[0], r) for pc, r in triples])
    return lp_c.mean().item(), lp_r.mean().item()


def test_rows_exactly_once_and_metrics_per_step(world):
    spec, files, info = world
    probes = pipeline.load_probes_file(files)
    for name, expect_evals in (("sft", [0, 2, 4]), ("dpo", [0, 3, 6, 8])):
        run_id = spec.run_id(spec.run(name))
        traj = _table(files, "trajectories", run_id)
        assert sorted(traj["step"].unique().to_list()) == expect_evals, name
        assert traj.group_by("step", "example_id", "response_type").len()["len"].max() == 1
        assert traj.height == len(expect_evals) * probes.height
        assert traj["phase"].unique().to_list() == [spec.run(name).algo]
        metrics = _table(files, "train_metrics", run_id).sort("step")
        assert metrics["step"].to_list() == list(range(1, info[name].steps + 1))
        assert metrics["grad_norm"].is_finite().all() and (metrics["clip_factor"] <= 1).all()
        rewards = metrics.select("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin")
        if name == "sft":
            assert rewards.null_count().row(0) == (metrics.height,) * 4
        else:
            assert rewards.null_count().row(0) == (0, 0, 0, 0)


def test_dpo_rewards_start_at_exactly_zero(world):
    spec, files, _ = world
    first = _table(files, "train_metrics", spec.run_id(spec.run("dpo"))).sort("step").row(0, named=True)
    # step 1's forward runs before any update, on the reference weights, in the reference's batches
    for col in ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin"):
        assert first[col] == 0.0, col
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_lowers_rejected_on_training_pairs(world):
    spec, files, info = world
    _, tok = load_model_and_tokenizer(info["sft"].checkpoint, device="cpu")
    triples = _train_triples(spec, files, tok)
    c0, r0 = _mean_logps(info["sft"].checkpoint, triples)
    c1, r1 = _mean_logps(info["dpo"].checkpoint, triples)
    assert r1 < r0 - 2.0                 # y- pushed down by more than two nats on average
    assert (c1 - r1) > (c0 - r0) + 1.0   # and the chosen-rejected gap widens
    metrics = _table(files, "train_metrics", spec.run_id(spec.run("dpo"))).sort("step")
    assert metrics["rewards_margin"][-1] > 0


def test_chain_starts_from_parent_checkpoint(world):
    spec, files, info = world
    key = ["example_id", "response_type"]
    for parent, child in (("sft", "dpo"), ("dpo", "ipo")):
        p = _table(files, "trajectories", spec.run_id(spec.run(parent)))
        c = _table(files, "trajectories", spec.run_id(spec.run(child)))
        p_last = p.filter(pl.col("step") == p["step"].max()).sort(key)
        c_first = c.filter(pl.col("step") == 0).sort(key)
        assert p_last.select(key).equals(c_first.select(key))
        # same weights at the child's start: identical probe scores
        assert (p_last["logp_sum"] - c_first["logp_sum"]).abs().max() < 1e-9
    assert info["sft"].step_offset == 0
    assert info["dpo"].step_offset == info["sft"].steps
    assert info["ipo"].step_offset == info["sft"].steps + info["dpo"].steps  # recursive
    meta = read_metadata(info["ipo"].checkpoint)
    assert meta["step_offset"] == info["ipo"].step_offset and meta["start_from"] == "dpo"
    assert meta["parent_config_hash"] == info["dpo"].config_hash


def test_extend_sft_trains_on_chosen_and_rejected(world):
    spec, files, info = world
    n_train = spec.dataset.synthetic.n_train
    assert info["extend"].train_examples == 2 * n_train
    assert info["sft"].train_examples == n_train
    # half an epoch over 2n examples takes as many steps as the full epoch of y+-only SFT
    assert info["extend"].steps == info["sft"].steps


def test_missing_parent_checkpoint_is_a_clear_error(world, tmp_path):
    spec, _, _ = world
    empty = pipeline.files_for(spec, Paths(tmp_path / "other"))
    with pytest.raises(LdpipeError, match=r"materialize tiny/run_sft first"):
        pipeline.start_point(spec, spec.run("dpo"), empty)


def test_child_hash_follows_parent_config():
    base = _spec()
    changed = _spec(sft={"lr": 1.0e-3})
    h = lambda s, n: s.run_config_hash(s.run(n))  # noqa: E731
    assert h(base, "sft") != h(changed, "sft")
    assert h(base, "dpo") != h(changed, "dpo")      # child of the changed run
    assert h(base, "ipo") != h(changed, "ipo")      # grandchild too
    assert h(base, "extend") == h(changed, "extend")  # not in the chain
    dpo = base.run("dpo")
    assert base.run_config_hash(dpo, parent_hash=h(base, "sft")) == h(base, "dpo")
    assert base.run_config_hash(dpo, parent_hash="0" * 12) != h(base, "dpo")


@pytest.mark.parametrize("runs,needle", [
    ([{"name": "a", "start_from": "nope"}], "start_from 'nope' is not a run"),
    ([{"name": "a", "start_from": "a"}], "cycle: a -> a"),
    ([{"name": "a", "start_from": "b"}, {"name": "b", "start_from": "c"}, {"name": "c", "start_from": "a"}],
     "cycle"),
    ([{"name": "a", "algo": "dpo", "supervise": "rejected"}], "supervise applies to algo 'sft' only"),
    ([{"name": "a", "algo": "ipo", "label_smoothing": 0.1}], "label_smoothing (cDPO) applies to algo 'dpo'"),
    ([{"name": "a", "supervise": "chosen+irr_hum"}], "the only combined target"),
    ([{"name": "a", "algo": "kto"}], "runs[a].algo"),
    ([{"name": "a", "beta": 0}], "runs[a].beta"),
])
def test_spec_errors(runs, needle):
    with pytest.raises(SpecError) as e:
        parse_experiment({"name": "x", "runs": runs}, source="decl.yaml")
    assert needle in str(e.value) and "decl.yaml" in str(e.value)


def test_bf16_autocast_trains_close_to_fp32_and_auto_is_fp32_on_cpu(world):
    """autocast "bf16" runs the forwards in bf16 (log-softmax and sums stay fp32); "auto" is fp32 on a CPU."""
    spec, files, info = world
    assert info["sft"].precision == "fp32"
    run = spec.run("sft")
    bf16 = run.model_copy(update={"name": "sft_bf16", "autocast": "bf16"})
    assert spec.run_config_hash(bf16) != spec.run_config_hash(run.model_copy(update={"name": "sft_bf16"}))
    spec2 = spec.model_copy(update={"runs": (*spec.runs, bf16)})
    got = pipeline.train_run(spec2, bf16, files, device="cpu", log=lambda m: None)
    assert got.precision == "bf16-autocast" and math.isfinite(got.final_loss)
    a = _table(files, "trajectories", "tiny.sft").sort("step", "example_id", "response_type")
    b = _table(files, "trajectories", "tiny.sft_bf16").sort("step", "example_id", "response_type")
    assert a.select("step", "example_id", "response_type").equals(b.select("step", "example_id", "response_type"))
    diff = (a["logp_sum"] - b["logp_sum"]).abs()
    # bf16 rounding moves the sums, but they stay close (measured: max 0.064 nats, 0.052 at step 0)
    assert 0 < diff.max() < 0.5
    assert diff.filter(a["step"] == 0).max() < 0.5
