"""`ldpipe bench tracking`: wall time of a training run with probe tracking vs the same run without it.

Cadence: the reference implementation scores its 500-prompt probe set every 1000 training examples.
Scaled to this probe set's size (the same scoring work per training example), that is every
1000 * n_prompts / 500 examples, i.e. every 10 steps of 8 for the default's 40 prompts, which is the
default experiment's `eval_every`. Both runs evaluate at step 0 and the last step as ldpipe always does;
the untracked run has an empty probe set, so it pays for everything except scoring.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from ldpipe.bench.common import Timer, encoded_probes, save_default_model, set_threads, world


def _run(model_path: Path, store_root: Path, probes, *, epochs: float, eval_every: int, batch_size: int,
         tag: str) -> float:
    from ldpipe.spec import RunSpec
    from ldpipe.store import Store
    from ldpipe.train import run_training

    w = world()
    train = w.preferences.filter(pl.col("split") == "train").sort("example_id")
    examples = list(zip(train["prompt"].to_list(), train["chosen"].to_list()))
    run = RunSpec(name=tag, algo="sft", epochs=epochs, batch_size=batch_size, lr=5e-4, eval_every=eval_every)
    with Timer() as t:
        run_training(run, run_id=f"bench.{tag}", config_hash=tag, model_path=model_path, examples=examples,
                     probes=probes, store=Store(store_root), out_dir=store_root.parent / tag,
                     max_prompt_tokens=96, max_response_tokens=64, device="cpu", log=lambda _m: None)
    return t.seconds


def bench_tracking(*, quick: bool = False, threads: int | None = None, n_prompts: int | None = None,
                   repeats: int | None = None) -> dict:
    n_threads = set_threads(threads)
    n = n_prompts or 40
    batch = 8
    eval_every = max(1, round(1000 * n / 500 / batch))
    epochs = 1.0 if quick else 3.0
    repeats = repeats or 1
    probes = encoded_probes(n)
    n_resp = sum(len(p.response_ids) for p in probes)
    with tempfile.TemporaryDirectory(prefix="ldpipe-bench-") as tmp:
        root = Path(tmp)
        model_path = save_default_model(root / "base")
        times = {"tracked": [], "untracked": []}
        for i in range(repeats):   # interleaved, so drift in machine load hits both alike
            times["untracked"].append(_run(model_path, root / f"store-u{i}", [], epochs=epochs,
                                           eval_every=eval_every, batch_size=batch, tag=f"untracked{i}"))
            times["tracked"].append(_run(model_path, root / f"store-t{i}", probes, epochs=epochs,
                                         eval_every=eval_every, batch_size=batch, tag=f"tracked{i}"))
    steps = round(epochs * -(-world().preferences.filter(pl.col("split") == "train").height // batch))
    evals = len({0, steps, *range(eval_every, steps + 1, eval_every)})
    base, tracked = min(times["untracked"]), min(times["tracked"])
    overhead = tracked / base - 1
    results = [
        {"method": "without tracking", "seconds": base, "evals": 0, "overhead_pct": 0.0},
        {"method": "with tracking", "seconds": tracked, "evals": evals, "overhead_pct": 100 * overhead},
    ]
    return {
        "benchmark": "tracking",
        "title": f"SFT, {steps} steps of {batch}, probe set {n} prompts x {n_resp // n} types ({n_resp} responses) "
                 f"scored every {eval_every} steps, {n_threads} threads",
        "context": {"steps": steps, "batch_size": batch, "eval_every": eval_every, "evals": evals,
                    "probe_responses": n_resp, "threads": n_threads, "repeats": repeats,
                    "all_seconds": times},
        "columns": ["method", "seconds", "evals", "overhead_pct"],
        "results": results,
        "goal": "tracking overhead <= 20%",
        "goal_met": overhead <= 0.20,
        "notes": "cadence: the reference scores 500 prompts every 1000 training examples; scaled to this probe "
                 f"set ({n} prompts) that is every {eval_every} steps of {batch}. Best of {repeats} run(s) each.",
    }
