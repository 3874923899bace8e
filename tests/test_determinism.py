"""Promise 9: the same declarations and seeds give identical probe sets and, on CPU, identical trajectories.

Two fresh ldpipe homes, each built by its own Python process (different PYTHONHASHSEED, so nothing may depend on
set/dict hash order) running every stage of one tiny project: dataset, probe set, base-model pretraining, an SFT
run and a DPO run started from it. The results are compared bit for bit (tolerance 0): the probe set file, the
base model's weights, every trajectory value and every training metric.
"""
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
from conftest import TINY_YAML

REPO = Path(__file__).resolve().parents[1]
YAML = TINY_YAML + "  - {name: dpo, algo: dpo, start_from: sft, epochs: 1, batch_size: 8, lr: 1.0e-3, eval_every: 2}\n"

BUILD = """
import torch
torch.set_num_threads(1)
from pathlib import Path
from ldpipe import pipeline
from ldpipe.paths import project_dir
from ldpipe.spec import load_experiments
spec, = load_experiments(project_dir() / "assets")
files = pipeline.files_for(spec)
quiet = lambda m: None
pipeline.build_dataset(spec, files, log=quiet)
pipeline.build_probes(spec, files, log=quiet)
pipeline.build_base_model(spec, files, device="cpu", log=quiet)
for run in spec.runs:                      # declaration order: sft, then dpo from it
    pipeline.train_run(spec, run, files, device="cpu", log=quiet)
"""

KEYS = ["run_id", "step", "example_id", "response_type"]


def _build(proj: Path, home: Path, hash_seed: str) -> subprocess.Popen:
    env = {**os.environ, "LDPIPE_PROJECT_DIR": str(proj), "LDPIPE_HOME": str(home), "PYTHONHASHSEED": hash_seed,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _table(home: Path, table: str, keys: list[str]) -> pl.DataFrame:
    return pl.read_parquet(home / "store" / table / "**" / "*.parquet", hive_partitioning=False).sort(keys)


def test_two_fresh_homes_give_bit_identical_probes_models_and_trajectories(tmp_path):
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "sql").symlink_to(REPO / "sql")
    (proj / "assets" / "tiny.yaml").write_text(YAML)
    homes = [tmp_path / "home_a", tmp_path / "home_b"]
    procs = [_build(proj, h, seed) for h, seed in zip(homes, ("1", "2"))]   # side by side: 2 cores
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = homes

    for name in ("preferences.parquet", "probes.parquet"):
        fa, fb = (h / "datasets" / "tiny" / name for h in homes)
        assert pl.read_parquet(fa).equals(pl.read_parquet(fb)), name
        assert fa.read_bytes() == fb.read_bytes(), name              # the very same file
    probes = pl.read_parquet(a / "datasets" / "tiny" / "probes.parquet")
    assert probes.height > 0 and probes["response_type"].n_unique() > 5

    weights = sorted((a / "models").rglob("*.safetensors"))
    assert len(weights) == 3                                         # base model, sft final, dpo final
    for wa in weights:
        assert wa.read_bytes() == (b / wa.relative_to(a)).read_bytes(), wa.relative_to(a)

    ta, tb = _table(a, "trajectories", KEYS), _table(b, "trajectories", KEYS)
    assert set(ta["run_id"]) == {"tiny.sft", "tiny.dpo"}
    assert ta.height == tb.height and ta.height > 0
    assert ta.equals(tb)                                             # every value, bit for bit (NaN == NaN)
    ma, mb = _table(a, "train_metrics", ["run_id", "step"]), _table(b, "train_metrics", ["run_id", "step"])
    assert ma.height > 0 and ma.equals(mb)
