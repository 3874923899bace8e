"""`ldpipe bench memory`: peak memory of scoring and influence, each workload in a fresh subprocess.

Sizes: the default architecture (1.2M parameters) and a large one (--arch, default 160m: the
Pythia-160M GPT-NeoX shape, hidden 768, 12 layers, 12 heads, vocabulary 50,304), random weights.
Peak RSS comes from getrusage(RUSAGE_SELF).ru_maxrss of the child, so imports (torch, polars) are
included; the `baseline` row (imports and model only, no work) separates them. On CUDA the child
also reports torch.cuda.max_memory_allocated (tensors only, not the allocator's cache).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD_TIMEOUT_S = 3600


def _child(workload: str, size: str, n_prompts: int, n_train: int, device: str) -> dict:
    import resource

    import torch

    from ldpipe.bench.common import bench_model, encoded_probes, tokenizer, world
    from ldpipe.model.lm import count_parameters

    torch.set_num_threads(int(os.environ.get("LDPIPE_BENCH_THREADS", "1")))
    dev = torch.device(device)
    model = bench_model(size).to(dev)
    model.eval()
    enc = encoded_probes(n_prompts)
    if workload == "scoring":
        from ldpipe.model.scoring import score_probes

        score_probes(model, enc)
    elif workload.startswith("influence"):
        import polars as pl

        from ldpipe.influence.entk import exact_entk
        from ldpipe.influence.projected import projected_entk
        from ldpipe.model.scoring import encode_pair

        train = world().preferences.filter(pl.col("split") == "train").sort("example_id").head(n_train)
        tp = [encode_pair(tokenizer(), p, c, max_prompt_tokens=96, max_response_tokens=64)
              for p, c in zip(train["prompt"].to_list(), train["chosen"].to_list())]
        pp = [(ep.prompt_ids, r) for ep in enc for r in ep.response_ids]
        if workload == "influence_exact":
            exact_entk(model, tp, pp, block=8)
        else:
            projected_entk(model, tp, pp, rank=32)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss_kib / 1024, "parameters": count_parameters(model)}
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def bench_memory(*, quick: bool = False, threads: int | None = None, arch: str = "160m",
                 device: str | None = None) -> dict:
    from ldpipe.bench.common import ARCHS, bench_device
    from ldpipe.errors import LdpipeError

    if arch not in ARCHS or arch == "default":
        raise LdpipeError(f"memory --arch is the large model next to the default; choose one of "
                          f"{[a for a in ARCHS if a != 'default']}, got {arch!r}")
    dev = bench_device(device)
    n_prompts_small, n_prompts_big = (10, 2) if quick else (40, 4)
    plan = [("baseline", "default", n_prompts_small, 0), ("scoring", "default", n_prompts_small, 0),
            ("influence_projected", "default", n_prompts_small // 2, 16),
            ("influence_exact", "default", n_prompts_small // 2, 16),
            ("baseline", arch, n_prompts_big, 0), ("scoring", arch, n_prompts_big, 0),
            ("influence_projected", arch, n_prompts_big // 2 or 1, 4)]
    if not quick:
        plan.append(("influence_exact", arch, 1, 2))
    env = {**os.environ, "LDPIPE_BENCH_THREADS": str(threads or min(2, os.cpu_count() or 1))}
    results = []
    for workload, size, n_prompts, n_train in plan:
        cmd = [sys.executable, "-m", "ldpipe.bench.memory", workload, size, str(n_prompts), str(n_train), str(dev)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=_CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            results.append({"workload": workload, "model": size, "error": f"timed out after {_CHILD_TIMEOUT_S} s"})
            continue
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            results.append({"workload": workload, "model": size, "error": last[0][:200]})
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"workload": workload, "model": size, "prompts": n_prompts, "train": n_train, **out,
                        "weights_mb": out["parameters"] * 4 / 2**20})
    # On CUDA the work's memory is on the device (host RSS still holds the model built on the CPU).
    key = "peak_cuda_mb" if dev.type == "cuda" else "peak_rss_mb"
    base = {r["model"]: r[key] for r in results if r["workload"] == "baseline" and key in r}
    for r in results:
        if key in r and r["model"] in base:
            r["above_baseline_mb"] = r[key] - base[r["model"]]
    return {
        "benchmark": "memory",
        "title": f"peak memory per workload on {dev.type} (fresh subprocess each)",
        "context": {"threads": env["LDPIPE_BENCH_THREADS"], "device": str(dev)},
        "columns": ["workload", "model", "parameters", "prompts", "train", "weights_mb", "peak_rss_mb",
                    "above_baseline_mb"] + (["peak_cuda_mb"] if dev.type == "cuda" else [])
                   + (["error"] if any("error" in r for r in results) else []),
        "results": results,
        "goal": None, "goal_met": None,
        "notes": f"above_baseline = peak {'CUDA memory' if dev.type == 'cuda' else 'RSS'} minus the same "
                 "model's imports-and-weights baseline; influence_exact "
                 "holds (N + block) full per-sequence gradients, projected holds rank-r factors only.",
    }


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
