"""Model-made probe types (y_init, y_selfr, random tokens), user-declared types, the per-type cache
(a rerun builds nothing; adding a type builds only it) and the reference-file import."""
import random
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from conftest import TINY_YAML

from ldpipe import pipeline
from ldpipe.errors import LdpipeError, SpecError
from ldpipe.paths import Paths
from ldpipe.probes.build import build_custom_type
from ldpipe.schema import PROBE_SCHEMA
from ldpipe.spec import parse_experiment

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_base_probe_test.jsonl"
CUSTOM = [{"name": "chosen_half", "from": "chosen", "transform": "truncate", "fraction": 0.5},
          {"name": "polite", "transform": "template", "text": "{chosen} I hope this helps."},
          {"name": "init_reversed", "from": "chosen_initial", "transform": "reverse_words"}]


def quiet(_m: str) -> None:
    pass


def _spec(**probes):
    data = yaml.safe_load(TINY_YAML)
    data["probes"] = {**data["probes"], "custom_types": CUSTOM, **probes}
    return parse_experiment(data, source="test")


def _by_type(df: pl.DataFrame, t: str) -> dict[str, str]:
    return dict(df.filter(pl.col("response_type") == t).select("example_id", "response").iter_rows())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    spec = _spec()
    files = pipeline.files_for(spec, Paths(tmp_path_factory.mktemp("home")))
    pipeline.build_dataset(spec, files, log=quiet)
    stage1 = pipeline.build_probes(spec, files, log=quiet)
    pipeline.build_base_model(spec, files, device="cpu", log=quiet)
    stage2 = pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    return spec, files, stage1, stage2


def test_model_types_for_every_prompt_and_joined(built):
    spec, files, stage1, stage2 = built
    assert set(stage2.types) == {"chosen_initial", "chosen_selfr", "random_tokens", "init_reversed"}
    for t in ("chosen_initial", "chosen_selfr", "random_tokens"):
        assert "model_probes" in stage1.skipped[t]          # deferred, with the reason
    probes = pipeline.load_probes_file(files)
    own = pl.read_parquet(files.probes)
    model_rows = pl.read_parquet(files.model_probes)
    assert probes.height == own.height + model_rows.height and probes.schema == pl.Schema(PROBE_SCHEMA)
    assert stage2.checks["n_missing"] == 0 and stage2.checks["duplicates"] == 0
    assert stage2.checks["prompt_mismatch"] == 0
    chosen = _by_type(probes, "chosen")
    for t in ("chosen_initial", "chosen_selfr", "random_tokens", "init_reversed", "chosen_half", "polite"):
        assert _by_type(probes, t).keys() == chosen.keys(), t
    init = model_rows.filter(pl.col("response_type") == "chosen_initial")
    assert all(p.startswith("base_model:") and p.endswith(":greedy") for p in init["provenance"])
    assert all(y.startswith(" ") for y in init["response"])   # y+'s leading space, as the scorer sees y+
    # y_init is the model's own greedy continuation of the probe prompt, cut at the stop markers
    from ldpipe.model.checkpoints import load_model_and_tokenizer
    from ldpipe.model.generate import GenerationConfig, generate

    model, tok = load_model_and_tokenizer(pipeline.base_model_path(spec, files))
    ids = sorted(chosen)
    prompts = dict(probes.select("example_id", "prompt").unique().iter_rows())
    g = spec.probes.generation
    raw = generate(model, tok, [prompts[i] for i in ids],
                   GenerationConfig(max_new_tokens=g.max_new_tokens, max_prompt_tokens=spec.probes.max_prompt_tokens))
    got = _by_type(init, "chosen_initial")
    for i, text in zip(ids, raw):
        assert got[i] == " " + pipeline._cut(text, g.stop)[0]
    # random tokens: as many tokens as y+ (up to re-tokenization), none special
    rnd = _by_type(probes, "random_tokens")
    for i, y in chosen.items():
        n, m = len(tok.encode(y, add_special_tokens=False)), len(tok.encode(rnd[i], add_special_tokens=False))
        assert n // 2 <= m <= 2 * n and tok.eos_token not in rnd[i]
    # a custom type made from a model type is built by the model stage, from its rows
    rev = _by_type(probes, "init_reversed")
    assert all(rev[i].split() == list(reversed(got[i].split())) for i in ids)


def test_rerun_is_a_no_op_and_a_rebuild_gives_the_same_set(built):
    spec, files, _, _ = built
    before = {p: p.read_bytes() for p in (files.probes, files.model_probes)}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    s1 = pipeline.build_probes(spec, files, log=quiet)
    s2 = pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    for info in (s1, s2):
        assert info.cache.built == [] and info.cache.reused and not info.written
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes      # not even rewritten
    # from scratch (cache deleted): the same recipe gives byte-identical files
    shutil.rmtree(files.data_dir / "probe_cache")
    s1 = pipeline.build_probes(spec, files, log=quiet)
    s2 = pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    assert s1.cache.reused == [] and "chosen_initial" in s2.cache.built
    assert {p: p.read_bytes() for p in before} == before


def test_sampling_is_configurable_and_rebuilds_only_generated_types(built):
    _, files, _, _ = built
    spec = _spec(generation={"do_sample": True, "temperature": 1.0, "seed": 3})
    info = pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    assert info.cache.built == ["chosen_initial", "chosen_selfr", "init_reversed"]
    assert info.cache.reused == ["random_tokens"]
    rows = pl.read_parquet(files.model_probes)
    assert all("sample:t=1.0:p=1.0:seed=3" in p for p in
               rows.filter(pl.col("response_type") == "chosen_initial")["provenance"])
    sampled = rows
    shutil.rmtree(files.data_dir / "probe_cache")   # seeded: sampling again gives the same rows
    pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    assert pl.read_parquet(files.model_probes).equals(sampled)
    pipeline.build_probes(built[0], files, log=quiet)   # back to the module's recipe
    pipeline.build_model_probes(built[0], files, device="cpu", log=quiet)


def test_adding_a_custom_type_builds_only_it(built):
    spec, files, _, _ = built
    more = _spec(custom_types=[*CUSTOM, {"name": "chosen_rev", "from": "chosen", "transform": "reverse_words"}])
    info = pipeline.build_probes(more, files, log=quiet)
    assert info.cache.built == ["chosen_rev"] and info.written
    assert "chosen" in info.cache.reused and "polite" in info.cache.reused
    # the model stage must be rebuilt against the new probe file: until then the union is refused
    with pytest.raises(LdpipeError, match="materialize tiny/model_probes again"):
        pipeline.load_probes_file(files)
    again = pipeline.build_model_probes(more, files, device="cpu", log=quiet)
    assert again.cache.built == []        # its inputs did not change
    assert "chosen_rev" in set(pipeline.load_probes_file(files)["response_type"])
    pipeline.build_probes(spec, files, log=quiet)
    pipeline.build_model_probes(spec, files, device="cpu", log=quiet)


def test_custom_transforms():
    rows = [("a", "chosen", "P1", " one two three four five"), ("b", "chosen", "P2", " six seven"),
            ("a", "rejected", "P1", " no"), ("b", "rejected", "P2", " nope")]
    df = pl.DataFrame([(*r, "dataset") for r in rows], schema=PROBE_SCHEMA, orient="row")
    pool = {t: df.filter(pl.col("response_type") == t) for t in ("chosen", "rejected")}
    spec = _spec(custom_types=[
        {"name": "t_words", "transform": "truncate", "words": 2},
        {"name": "t_frac", "transform": "truncate", "fraction": 0.5},
        {"name": "rev", "from": "rejected", "transform": "reverse_words"},
        {"name": "tpl", "transform": "template", "text": "Q: {prompt} A:{chosen} not{rejected} {1}"},
        {"name": "shuf", "from": "t_words", "transform": "shuffle_words"}])
    got = {}
    for ct in spec.probes.custom_types:
        out, why = build_custom_type(ct, {**pool, **got}, seed=0)
        assert why == "" and out.schema == pl.Schema(PROBE_SCHEMA)
        got[ct.name] = out
        assert all(p.startswith(f"custom:{ct.name}:") for p in out["provenance"])
    assert _by_type(got["t_words"], "t_words") == {"a": " one two", "b": " six seven"}
    assert _by_type(got["t_frac"], "t_frac") == {"a": " one two three", "b": " six"}
    assert _by_type(got["rev"], "rev") == {"a": " no", "b": " nope"}
    assert _by_type(got["tpl"], "tpl")["a"] == " Q: P1 A:one two three four five notno {1}"
    assert _by_type(got["shuf"], "shuf") == {"a": " two one", "b": " seven six"}   # a true permutation
    out, why = build_custom_type(spec.probes.custom_types[2], {"chosen": pool["chosen"]}, seed=0)
    assert out is None and "'rejected'" in why


@pytest.mark.parametrize("custom, message", [
    ([{"name": "chosen", "transform": "reverse_words"}], r"custom_types\[0\].*clashes with the core response type"),
    ([{"name": "x", "from": "chosn", "transform": "reverse_words"}], r"custom_types\[0\].*from 'chosn' is not"),
    ([{"name": "x", "transform": "reverse_words"}, {"name": "x", "transform": "reverse_words"}],
     r"custom_types\[1\] \(name 'x'\): duplicate name"),
    ([{"name": "x", "from": "y", "transform": "reverse_words"}, {"name": "y", "transform": "reverse_words"}],
     r"from 'y' is not a core response type or an earlier custom type"),
    ([{"name": "x", "transform": "template", "text": "{chosen} {answer}"}], r"custom_types\[x\].*placeholder.*answer"),
    ([{"name": "x", "transform": "truncate"}], r"custom_types\[x\].*exactly one of words, fraction"),
    ([{"name": "x", "transform": "shuffle_words", "words": 3}], r"custom_types\[x\].*takes no \['words'\]"),
    ([{"name": "x", "transform": "rot13"}], r"custom_types\[x\]\.transform"),
    ([{"name": "x", "transform": "reverse_words", "param": 1}], r"custom_types\[x\]\.param: unknown key"),
])
def test_custom_type_declaration_errors(custom, message):
    with pytest.raises(SpecError, match=message):
        _spec(custom_types=custom)


def test_selfr_template_must_hold_chosen():
    with pytest.raises(SpecError, match=r"probes.generation.selfr_template.*\{chosen\}"):
        _spec(generation={"selfr_template": "Rephrase this:"})


@pytest.mark.skipif(not REFERENCE_FILE.is_file(), reason="the reference probe file is not present")
def test_reference_file_import_selection_and_model_stage(built, tmp_path):
    _, tiny_files, _, _ = built
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_files.base_model(built[0]), ckpt)

    def run(selection: str):
        spec = parse_experiment({"name": "ref", "dataset": {"kind": "reference_probes", "path": str(REFERENCE_FILE),
                                                            "limit": 12},
                                 "probes": {"n_examples": 5, "selection": selection, "seed": 1},
                                 "model": {"kind": "pretrained", "name_or_path": str(ckpt)}}, source="test")
        files = pipeline.files_for(spec, Paths(tmp_path / f"home-{selection}"))
        pipeline.build_dataset(spec, files, log=quiet)
        info = pipeline.build_probes(spec, files, log=quiet)
        return spec, files, info

    spec, files, first = run("first")
    probes = pl.read_parquet(files.probes)
    assert sorted(probes["example_id"].unique()) == [f"hh_helpful_base_probe_test-{i}" for i in range(5)]
    # the reference's 13 keys map onto the core types, with provenance naming the key
    assert set(first.types) == {"chosen", "rejected", "chosen_initial", "chosen_selfr", "chosen_gptsemantic",
                                   "chosen_gptformat", "reject_gptsemantic", "reject_gptformat", "irr_train",
                                   "irr_test", "irr_hum", "random_permute", "random_nonhum"}
    assert probes.filter(pl.col("response_type") == "reject_gptformat")["provenance"][0] in (
        "reference:reject_gptformat", "reference:rejected_gptformat")
    assert first.checks["n_missing"] == 0
    _, _, rand = run("random")
    want = sorted(random.Random("1:selection").sample(range(12), 5))
    picked = sorted(pl.read_parquet(Path(rand.path))["example_id"].unique())
    assert picked == sorted(f"hh_helpful_base_probe_test-{i}" for i in want) and picked != sorted(
        probes["example_id"].unique())
    # the model stage keeps the file's y_init / y_selfr and adds only random tokens of the model's vocabulary
    m = pipeline.build_model_probes(spec, files, device="cpu", log=quiet)
    assert m.types == ["random_tokens"]
    assert "provided by the dataset" in m.skipped["chosen_initial"]
    assert pipeline.load_probes_file(files).height == probes.height + 5


def test_dagster_assets_rerun_builds_nothing(tiny_project):
    import dagster as dg

    from ldpipe.defs.experiments import build_defs
    from ldpipe.defs.resources import Compute, LdpipeHome
    from ldpipe.spec import load_experiments

    defs = build_defs(load_experiments(tiny_project / "assets"))
    wanted = {"tiny/dataset", "tiny/probe_set", "tiny/base_model", "tiny/model_probes"}
    assets = [a for a in defs.assets if {k.to_user_string() for k in a.keys} & wanted]
    resources = {"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")}
    instance = dg.DagsterInstance.ephemeral()
    runs = [dg.materialize(assets, resources=resources, instance=instance) for _ in range(2)]
    metas = []
    for r in runs:
        assert r.success
        metas.append({m.asset_key.to_user_string(): m.materialization.metadata
                      for m in r.get_asset_materialization_events()})
        checks = {c.check_name: c for c in r.get_asset_check_evaluations()}
        assert checks["every_type_for_every_prompt"].passed and checks["model_types_for_every_prompt"].passed
        assert "model_types_informative" in checks
    first, second = metas
    assert set(first["tiny/model_probes"]["types_built"].value) == {"chosen_initial", "chosen_selfr",
                                                                    "random_tokens"}
    for key in ("tiny/probe_set", "tiny/model_probes"):
        assert second[key]["types_built"].value == [] and second[key]["file_rewritten"].value is False
        assert "response_type" in second[key]["preview_per_type"].value
        assert "words_mean" in second[key]["length_per_type"].value
    run = next(a for a in defs.assets if dg.AssetKey(["tiny", "run_sft"]) in a.keys)
    assert dg.AssetKey(["tiny", "model_probes"]) in run.dependency_keys   # runs see the model-made rows
