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

from ldpipe.bench.common import Timer, bench_model, encoded_probes, save_bench_model, set_threads, world


def _train_examples() -> list[tuple[str, str]]:
    w = world()
    train = w.preferences.filter(pl.col("split") == "train").sort("example_id")
    return list(zip(train["prompt"].to_list(), train["chosen"].to_list()))


def _run(model_path: Path, store_root: Path, probes, *, epochs: float, eval_every: int, batch_size: int,
         tag: str, device: str, autocast: str) -> float:
    from ldpipe.spec import RunSpec
    from ldpipe.store.shards import Store
    from ldpipe.training.loop import run_training

    examples = _train_examples()
    # no resume checkpoints: their disk writes would dilute the overhead (the load and final save stay in)
    run = RunSpec(name=tag, algo="sft", epochs=epochs, batch_size=batch_size, lr=5e-4, eval_every=eval_every,
                  autocast=autocast, checkpoint_every=0)
    with Timer() as t:
        run_training(run, run_id=f"bench.{tag}", config_hash=tag, model_path=model_path, examples=examples,
                     probes=probes, store=Store(store_root), out_dir=store_root.parent / tag,
                     max_prompt_tokens=96, max_response_tokens=64, device=device, log=lambda _m: None)
    return t.seconds


def _work(shape, probes, epochs: float) -> tuple[float, float]:
    """(training work of the whole run, scoring work of one evaluation) in model FLOPs (bench.flops)."""
    from ldpipe.bench.common import tokenizer
    from ldpipe.bench.flops import shared_prefix_flops, training_flops
    from ldpipe.model.scoring import encode_pair

    enc = [encode_pair(tokenizer(), p, c, max_prompt_tokens=96, max_response_tokens=64) for p, c in _train_examples()]
    one_epoch = training_flops(shape, [(len(p), len(r)) for p, r in enc])
    return epochs * one_epoch, shared_prefix_flops(shape, probes)


def bench_tracking(*, quick: bool = False, threads: int | None = None, n_prompts: int | None = None,
                   repeats: int | None = None, arch: str = "default", device: str | None = None,
                   autocast: str = "fp32") -> dict:
    import torch

    from ldpipe.bench.common import bench_device
    from ldpipe.bench.flops import measured_peak, model_shape

    n_threads = set_threads(threads)
    dev = bench_device(device)
    n = n_prompts or 40
    batch = 8
    eval_every = max(1, round(1000 * n / 500 / batch))
    epochs = 1.0 if quick else 3.0
    repeats = repeats or (1 if quick else 2)
    # before any timed run: CUDA context, cuBLAS handles (else only the first run, untracked, pays for them)
    peak = measured_peak(dev, torch.bfloat16 if autocast == "bf16" else torch.float32)
    probes = encoded_probes(n)
    n_resp = sum(len(p.response_ids) for p in probes)
    with tempfile.TemporaryDirectory(prefix="ldpipe-bench-") as tmp:
        root = Path(tmp)
        model = bench_model(arch)
        shape = model_shape(model)
        model_path = save_bench_model(model, root / "base", arch)
        del model
        times = {"tracked": [], "untracked": []}
        for i in range(repeats):   # interleaved, so drift in machine load hits both alike
            times["untracked"].append(_run(model_path, root / f"store-u{i}", [], epochs=epochs,
                                           eval_every=eval_every, batch_size=batch, tag=f"untracked{i}",
                                           device=str(dev), autocast=autocast))
            times["tracked"].append(_run(model_path, root / f"store-t{i}", probes, epochs=epochs,
                                         eval_every=eval_every, batch_size=batch, tag=f"tracked{i}",
                                         device=str(dev), autocast=autocast))
    steps = round(epochs * -(-world().preferences.filter(pl.col("split") == "train").height // batch))
    evals = len({0, steps, *range(eval_every, steps + 1, eval_every)})
    base, tracked = min(times["untracked"]), min(times["tracked"])
    overhead = tracked / base - 1
    train_work, eval_work = _work(shape, probes, epochs)
    # No exact serial scorer can do the evaluations faster than their work at the matmul peak.
    floor = evals * eval_work / peak / base
    results = [
        {"method": "without tracking", "seconds": base, "evals": 0, "overhead_pct": 0.0,
         "gflop": train_work / 1e9, "gflop_per_s": train_work / base / 1e9},
        {"method": "with tracking", "seconds": tracked, "evals": evals, "overhead_pct": 100 * overhead,
         "gflop": (train_work + evals * eval_work) / 1e9,
         "gflop_per_s": (train_work + evals * eval_work) / tracked / 1e9},
    ]
    return {
        "benchmark": "tracking",
        "title": f"SFT, {steps} steps of {batch}, probe set {n} prompts x {n_resp // n} types ({n_resp} responses) "
                 f"scored every {eval_every} steps, {n_threads} threads",
        "context": {"steps": steps, "batch_size": batch, "eval_every": eval_every, "evals": evals,
                    "probe_responses": n_resp, "threads": n_threads, "repeats": repeats,
                    "all_seconds": times, "arch": arch, "device": str(dev), "autocast": autocast,
                    "training_gflop": train_work / 1e9, "scoring_gflop_per_eval": eval_work / 1e9,
                    "scoring_to_training_work": evals * eval_work / train_work,
                    "peak_gflop_per_s": peak / 1e9, "overhead_floor_pct": 100 * floor},
        "columns": ["method", "seconds", "evals", "overhead_pct", "gflop", "gflop_per_s"],
        "results": results,
        "goal": "tracking overhead <= 20%",
        "goal_met": overhead <= 0.20,
        "notes": "cadence: the reference scores 500 prompts every 1000 training examples; scaled to this probe "
                 f"set ({n} prompts) that is every {eval_every} steps of {batch}. Best of {repeats} run(s) each; "
                 "resume checkpoints off, the model load and final save included in both. "
                 f"Work: the {evals} evaluations are {100 * evals * eval_work / train_work:.0f}% of the training's "
                 f"model FLOPs; done at this machine's measured matmul peak ({peak / 1e9:.0f} GFLOP/s) they would "
                 f"still add {100 * floor:.0f}% to the untracked run: the least overhead any exact scorer run in "
                 "series with training can reach here.",
    }
