"""On-policy DPO: real tiny runs through pipeline.train_run -> train.run_training, built-in rewards, the judge
scorer against a real local OpenAI-compatible server (tests/fake_openai.py), and spec validation."""
import dataclasses
import math
import re

import polars as pl
import pytest
import torch
import yaml
from conftest import TINY_YAML, build_inputs
from fake_openai import FakeOpenAI

import ldpipe.training.loop
from ldpipe import pipeline
from ldpipe.data.synthetic import SyntheticConfig, generate
from ldpipe.errors import SpecError
from ldpipe.llm import LLMConfig
from ldpipe.model.checkpoints import load_model_and_tokenizer
from ldpipe.spec import parse_experiment
from ldpipe.store.shards import Store
from ldpipe.training.onpolicy import JudgeScorer, parse_score, parse_verdict, select_pair
from ldpipe.training.rewards import SyntheticFactReward, distinct_ngrams, make_reward

torch.set_num_threads(1)

ON_POLICY = {"n_samples": 3, "max_new_tokens": 16, "temperature": 1.0,
             "scorer": {"kind": "reward", "name": "ref_logp_mean"}}
RUNS = [
    {"name": "op", "algo": "dpo", "pairs": "on_policy", "on_policy": ON_POLICY, "epochs": 1, "batch_size": 4,
     "n_train": 12, "lr": 2.0e-3, "warmup_steps": 0, "eval_every": 2, "seed": 3},
    {"name": "facts", "algo": "ipo", "pairs": "on_policy", "epochs": 1, "batch_size": 4, "n_train": 8,
     "on_policy": {"n_samples": 2, "max_new_tokens": 12}, "eval_every": 1},
]


def _spec(runs=RUNS):
    data = yaml.safe_load(TINY_YAML)
    data["model"]["pretrain"]["steps"] = 40
    data["runs"] = runs
    return parse_experiment(data, source="test")


def _train(spec, files, name, run_changes=None):
    """train_run with a spy on make_objective: the real objective is used, and returned for inspection."""
    made = []
    real = ldpipe.training.loop.make_objective
    run = spec.run(name)
    if run_changes:
        run = run.model_copy(update=run_changes)
    mp = pytest.MonkeyPatch()
    mp.setattr(ldpipe.training.loop, "make_objective", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    try:
        info = pipeline.train_run(spec, run, files, device="cpu", log=lambda m: None)
    finally:
        mp.undo()
    metrics = Store(files.paths.store).read("train_metrics", run_id=spec.run_id(run)).sort("step")
    return info, made[0], metrics


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    spec = _spec()
    files = build_inputs(spec, tmp_path_factory.mktemp("ldhome"))
    first = _train(spec, files, "op")
    return spec, files, first


def _offline_pairs(files, n):
    train = pipeline.load_preferences_file(files).filter(pl.col("split") == "train").sort("example_id").head(n)
    return set(train.select("prompt", "chosen", "rejected").iter_rows())


# ------------------------------------------------------------------ runs

def test_on_policy_run_trains_on_fresh_ranked_pairs(world):
    spec, files, (info, obj, metrics) = world
    hist = obj.pairs_frame()
    steps = info.steps
    assert steps == 3 and metrics["step"].to_list() == [1, 2, 3]   # 12 prompts / batch 4
    assert hist.height == 12 and hist["step"].to_list() == [1] * 4 + [2] * 4 + [3] * 4
    pairs = hist.filter(~pl.col("tied"))
    assert pairs.height > 0
    # sampled from the policy, not the dataset's pairs; the chosen sample scores at least the rejected one
    assert not set(pairs.select("prompt", "chosen", "rejected").iter_rows()) & _offline_pairs(files, 12)
    assert (pairs["chosen_score"] > pairs["rejected_score"]).all()
    # the score is the mean log-prob under the reference (the starting checkpoint): recompute one
    row = pairs.row(0, named=True)
    assert obj.ref_logp_mean([row["prompt"]], [row["chosen"]])[0] == pytest.approx(row["chosen_score"], abs=1e-5)
    # metrics: finite loss, TRL-style rewards, on-policy stats; step 1 runs the policy = the reference
    assert all(math.isfinite(x) for x in metrics["loss"])
    first = metrics.row(0, named=True)
    assert first["rewards_margin"] == 0.0 and first["rewards_chosen"] == 0.0
    assert metrics["rewards_margin"].null_count() == 0 and metrics["rewards_margin"][-1] != 0.0
    tied = hist.group_by("step").agg(pl.col("tied").mean()).sort("step")["tied"].to_list()
    assert metrics["onpolicy_tied_share"].to_list() == pytest.approx(tied)
    assert metrics["onpolicy_score_mean"].null_count() == 0 and (metrics["onpolicy_score_mean"] < 0).all()
    # the sampled pairs are in the store (table onpolicy_pairs), exactly once per (step, prompt)
    stored = Store(files.paths.store).read("onpolicy_pairs", run_id=spec.run_id(spec.run("op"))).sort("step",
                                                                                                     "prompt_index")
    assert stored.drop("run_id", "config_hash").equals(hist.sort("step", "prompt_index"))
    assert stored["config_hash"].unique().to_list() == [info.config_hash]
    traj = Store(files.paths.store).read("trajectories", run_id=spec.run_id(spec.run("op")))
    assert sorted(traj["step"].unique().to_list()) == [0, 2, 3]
    assert traj.filter(pl.col("step") == 3)["logp_sum"].to_list() != traj.filter(pl.col("step") == 0)["logp_sum"]\
        .to_list()


def test_same_seed_same_pairs_and_metrics_other_seed_differs(world):
    spec, files, (_, obj, metrics) = world
    _, obj2, metrics2 = _train(spec, files, "op")
    assert obj2.pairs_frame().equals(obj.pairs_frame())
    cols = ["step", "loss", "grad_norm", "rewards_margin", "onpolicy_score_mean", "onpolicy_tied_share"]
    assert metrics2.select(cols).equals(metrics.select(cols))
    _, obj3, _ = _train(spec, files, "op", {"seed": 4})
    assert not obj3.pairs_frame().equals(obj.pairs_frame())


def test_all_tied_batches_are_skipped_and_counted(world):
    """The fact reward gives 0 to every reply of a barely pretrained model (no fact stated): every prompt ties,
    nothing is trained, and the metrics say so."""
    spec, files, _ = world
    info, obj, metrics = _train(spec, files, "facts")
    hist = obj.pairs_frame()
    assert hist["tied"].all() and hist["chosen"].null_count() == hist.height
    assert metrics["onpolicy_tied_share"].to_list() == [1.0] * info.steps
    assert metrics["loss"].to_list() == [0.0] * info.steps and metrics["grad_norm"].to_list() == [0.0] * 2
    assert metrics["rewards_margin"].null_count() == info.steps


def test_judge_scored_run_against_local_server(world, monkeypatch, tmp_path):
    """A pointwise judge ranks by reply length (the fake server's rule); a verdict it cannot parse is counted.
    Its cache lives in the home the run was given, whatever LDPIPE_HOME says (it followed LDPIPE_HOME before)."""
    spec, files, _ = world
    elsewhere = tmp_path / "env_home"
    monkeypatch.setenv("LDPIPE_HOME", str(elsewhere))
    files.paths.llm_cache.unlink(missing_ok=True)
    with FakeOpenAI() as srv:
        srv.decorate = _length_judge
        scorer = {"kind": "judge", "model": "judge-model", "base_url": srv.base_url, "max_attempts": 2,
                  "timeout_s": 5}
        info, obj, metrics = _train(spec, files, "op", {"on_policy": spec.run("op").on_policy.model_copy(
            update={"scorer": spec.run("op").on_policy.scorer.model_validate(scorer)})})
        assert srv.n_chat == obj.scorer.requests == 12 * 3
    assert files.paths.llm_cache.is_file() and not (elsewhere / "llm_cache.sqlite").exists()
    pairs = obj.pairs_frame().filter(~pl.col("tied"))
    assert pairs.height > 0
    for c, r, cs, rs in pairs.select("chosen", "rejected", "chosen_score", "rejected_score").iter_rows():
        assert (cs, rs) == (min(10, len(c.split())), min(10, len(r.split()))) and cs > rs
    # a step with at least one untied prompt trains and records its rewards; a fully tied one records none
    for tied, margin in metrics.select("onpolicy_tied_share", "rewards_margin").iter_rows():
        assert (margin is None) == (tied == 1.0)


def test_resume_state_restores_step_and_reference(world):
    spec, files, (info, obj, _) = world
    state = obj.state_dict()
    fresh = dataclasses.replace(obj, ref_model=None, step=0, history=[])
    fresh.load_state_dict(state)
    trained, _ = load_model_and_tokenizer(info.checkpoint, device="cpu")
    fresh._ensure_ref(trained, torch.device("cpu"))
    assert fresh.step == info.steps
    for (name, a), b in zip(obj.ref_model.state_dict().items(), fresh.ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    ref = fresh.ref_model.state_dict().values()
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), ref))   # not the policy


# ------------------------------------------------------------------ the judge scorer

REPLY = re.compile(r"Reply to grade:\n(.*)\n\nRate", re.S)
PAIR = re.compile(r"Reply A:\n(.*)\n\nReply B:\n(.*)\n\nWhich", re.S)


def _length_judge(user: str, reply: str) -> str:
    m = REPLY.search(user)
    if m:
        text = m.group(1)
        return "I refuse to grade this." if "MALFORMED" in text else f"Score: {min(10, len(text.split()))}"
    a, b = PAIR.search(user).groups()
    if "MALFORMED" in a + b:
        return "Both are fine, hard to say."
    return "A" if len(a.split()) >= len(b.split()) else "Reply B."


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_judge_scores_and_malformed_verdicts(tmp_path, mode):
    prompts = ["\n\nHuman: Where does Kalo live?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:"]
    samples = [[" one two", " one two three four", " MALFORMED one two three four five six"],
               [" a b c", " MALFORMED"]]
    with FakeOpenAI() as srv:
        srv.decorate = _length_judge
        cfg = LLMConfig(base_url=srv.base_url, model="judge", api_key_env="NO_SUCH_KEY", cache_path=tmp_path / "c.db",
                        max_attempts=2, timeout_s=5)
        judge = JudgeScorer(cfg, mode=mode, environ={})
        scores = judge.score(prompts, samples)
        again = JudgeScorer(cfg, mode=mode, environ={}).score(prompts, samples)   # from the cache
        calls = srv.n_chat
    assert again == scores
    if mode == "pointwise":
        assert calls == 5 and judge.unparsable == 2
        assert scores == [[2.0, 4.0, None], [3.0, None]]
        # the unscored sample is neither chosen nor rejected; one scored sample alone is a tie
        assert select_pair(samples[0], scores[0]) == (1, 0) and select_pair(samples[1], scores[1]) is None
    else:
        assert calls == 2 * (3 + 1) and judge.unparsable == 2 * 3    # every pair in both A/B orders
        # prompt 0: s1 beats s0 in both orders; both pairs with the malformed sample are ties (half a win each)
        assert scores == [[0.5 + 0.0, 1.0 + 0.5, 0.5 + 0.5], [0.5, 0.5]]
        assert select_pair(samples[0], scores[0]) == (1, 0) and select_pair(samples[1], scores[1]) is None


def test_pairwise_judge_position_bias_cancels(tmp_path):
    """A judge that always answers "A" prefers no sample once both orders are asked: no pair is chosen."""
    with FakeOpenAI() as srv:
        srv.decorate = lambda user, reply: "A"
        cfg = LLMConfig(base_url=srv.base_url, model="judge", api_key_env="NO_SUCH_KEY", cache_path=tmp_path / "c.db",
                        max_attempts=2, timeout_s=5)
        scores = JudgeScorer(cfg, mode="pairwise", environ={}).score(["\n\nHuman: hi\n\nAssistant:"],
                                                                      [[" short", " a longer reply", " mid one"]])
    assert scores == [[1.0, 1.0, 1.0]]
    assert select_pair([" short", " a longer reply", " mid one"], scores[0]) is None


def test_verdict_parsers():
    assert [parse_score(t) for t in ("7", "Score: 7", " 7/10", "10.", "0", "11", "seven", "7 or 8")] == \
        [7.0, 7.0, 7.0, 10.0, None, None, None, None]
    assert [parse_verdict(t) for t in ("A", "b", "Reply B.", "A or B", "neither")] == ["A", "B", "B", None, None]
    assert select_pair(["x", "y"], [1.0, 1.0]) is None and select_pair(["x", "x"], [2.0, 1.0]) is None


# ------------------------------------------------------------------ built-in rewards

def test_fact_reward_ranks_the_dataset_answers():
    w = generate(SyntheticConfig(seed=2, n_entities=16, n_train=48, n_test=4, corpus_docs=0))
    train = w.preferences.filter(pl.col("split") == "train")
    examples = list(train.select("prompt", "chosen", "rejected").iter_rows())
    fmt = dict(w.rephrases.filter(pl.col("response_type") == "chosen_gptformat")
               .select("example_id", "response").iter_rows())
    for reward in (make_reward("synthetic_facts", examples), SyntheticFactReward.from_facts(w.facts)):
        for eid, (p, c, r) in zip(train["example_id"], examples):
            assert reward(p, c) == 1.0                 # the right value, nothing else
            assert reward(p, r) in (0.0, -1.0)         # refusal / true off-topic fact: 0; wrong value: -1
            assert reward(p, fmt[eid]) == -1.0         # same wording, another value
        assert reward(examples[0][0], " Sorry, I do not know.") == 0.0
    p, c, _ = examples[0]
    entity = p.split("Human: ")[-1]
    other = next(e for e in w.facts["entity"].unique().sort() if e not in p and e not in c)
    borrowed = c.replace(next(n for n in re.findall(r"[A-Z][a-z]+", c) if n in entity), other)
    assert SyntheticFactReward.from_facts(w.facts)(p, borrowed) < 1.0   # the facts told of someone else


def test_fact_reward_needs_the_synthetic_world():
    with pytest.raises(Exception, match="synthetic-world question"):
        make_reward("synthetic_facts", [("\n\nHuman: hi\n\nAssistant:", " hello", " go away")])


def test_distinct_ngrams():
    assert distinct_ngrams("", " the cat sat on the mat") == 0.0
    assert distinct_ngrams("", " go go go go") == pytest.approx(-2 / 3)
    assert distinct_ngrams("", "") == -1.0


# ------------------------------------------------------------------ spec

@pytest.mark.parametrize("run, needle", [
    ({"name": "r", "algo": "sft", "pairs": "on_policy"}, "pairs 'on_policy' applies to algo 'dpo' or 'ipo'"),
    ({"name": "r", "algo": "dpo", "on_policy": {"n_samples": 2}}, "on_policy settings need pairs: on_policy"),
    ({"name": "r", "algo": "dpo", "pairs": "on_policy", "on_policy": {"n_samples": 1}}, "n_samples"),
    ({"name": "r", "algo": "dpo", "pairs": "on_policy", "on_policy": {"scorer": {"kind": "reward", "name": "x"}}},
     "needs name, one of"),
    ({"name": "r", "algo": "dpo", "pairs": "on_policy", "on_policy": {"scorer": {"kind": "judge"}}}, "needs model"),
    ({"name": "r", "algo": "dpo", "pairs": "on_policy", "on_policy": {"scorer": {"name": "distinct_ngrams",
                                                                                "model": "m"}}}, "judge' only"),
    ({"name": "r", "algo": "dpo", "pairs": "sometimes"}, "pairs"),
])
def test_spec_errors(run, needle):
    data = yaml.safe_load(TINY_YAML)
    data["runs"] = [run]
    with pytest.raises(SpecError, match=re.escape(needle)):
        parse_experiment(data, source="test.yaml")


def test_max_new_tokens_must_fit_the_response_limit(world):
    spec, files, _ = world
    run = spec.run("op")
    long = run.model_copy(update={"on_policy": run.on_policy.model_copy(update={"max_new_tokens": 40})})
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipeline.train_run(spec, long, files, device="cpu", log=lambda m: None)
