"""Trains TRL's SFTTrainer with ldpipe's tracking callback on a tiny seeded model (used by test_accelerate.py).

    python tests/trl_two_process.py STORE                                                   # one process, batch 4
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/trl_two_process.py STORE  # two, 2 each

The main process writes STORE.world_size: the number of processes the Trainer (through accelerate) trained with.
"""
import os
import sys
import tempfile

import polars as pl
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer
from ldpipe.probes.build import ProbeRecipe, build_probe_set
from ldpipe.training.callback import ProbeTrackingCallback

ROWS = [(f"q{i}", "train" if i < 12 else "test", f"Question {i}: what is item {i}?",
         f" Item {i} is a thing of colour {['red', 'blue', 'green'][i % 3]}.", f" No idea about {i}.")
        for i in range(16)]
BATCH = 4


def main(store: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefs = pl.DataFrame(ROWS, schema=["example_id", "split", "prompt", "chosen", "rejected"], orient="row") \
        .with_columns(pl.lit("script").alias("source"))
    tok = train_tokenizer([*prefs["prompt"], *prefs["chosen"], *prefs["rejected"]], vocab_size=300)
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        vocab_size=len(tok))
    probes = build_probe_set(prefs, ProbeRecipe(n_examples=4, selection="first",
                                                types=("chosen", "rejected", "irr_test"))).probes
    train = prefs.filter(pl.col("split") == "train")
    data = Dataset.from_dict({"prompt": train["prompt"].to_list(), "completion": train["chosen"].to_list()})
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data,
                             callbacks=[ProbeTrackingCallback(probes, store, run_id="dp.sft", eval_every=2)],
                             args=SFTConfig(output_dir=out, max_steps=6, per_device_train_batch_size=BATCH // world,
                                            learning_rate=5e-3, logging_steps=1, save_strategy="no",
                                            report_to="none", bf16=False, gradient_checkpointing=False,
                                            use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
                                            ddp_backend="gloo" if world > 1 else None))
        trainer.train()
        if trainer.is_world_process_zero():
            with open(f"{store}.world_size", "w") as f:
                f.write(str(trainer.accelerator.num_processes))


if __name__ == "__main__":
    main(sys.argv[1])
