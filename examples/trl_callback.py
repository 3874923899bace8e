"""Probe tracking inside a plain TRL script, without Dagster: SFT with TRL's SFTTrainer on examples/own_data/qa.jsonl,
every probe's log-probability recorded every 2 steps into an ldpipe store, then read back with DuckDB.

    .venv/bin/python examples/trl_callback.py                      # a tiny model built here, offline (seconds)
    .venv/bin/python examples/trl_callback.py --model ./my-hf-model # or any local Hugging Face checkpoint
    .venv/bin/python examples/trl_callback.py --lora                 # train a LoRA adapter (peft) instead

Multi-process: `python -m torch.distributed.run --standalone --nproc-per-node 2 examples/trl_callback.py` on CPUs
(`accelerate launch --cpu` starts one process), `accelerate launch --multi_gpu ...` on GPUs; the main process alone
scores and writes.
"""
import argparse
import os
import tempfile
from pathlib import Path

import duckdb
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ldpipe.data.loaders import load_local
from ldpipe.model.checkpoints import load_model_and_tokenizer
from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer
from ldpipe.probes.build import ProbeRecipe, build_probe_set
from ldpipe.training.callback import ProbeTrackingCallback

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local Hugging Face model folder (default: a tiny model built here)")
    ap.add_argument("--store", default=".ldpipe/trl_example/store",
                    help="the ldpipe store to write (a folder; default under the ignored .ldpipe/)")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adapter (r=8) through peft")
    args = ap.parse_args()

    prefs = load_local(HERE / "own_data" / "qa.jsonl", splits=("train", "test"),
                       columns={"example_id": "id", "prompt": "question", "chosen": "good", "rejected": "bad"})
    train = prefs.filter(prefs["split"] == "train")
    if args.model:
        model, tok = load_model_and_tokenizer(args.model)
    else:   # offline: a BPE tokenizer and a 2-layer GPT-NeoX on the data's own text (no pretraining: a demo)
        tok = train_tokenizer([*prefs["prompt"], *prefs["chosen"], *prefs["rejected"]], vocab_size=400)
        model = build_model(TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
                            vocab_size=len(tok))
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")

    # the probe set: y+, y-, other prompts' answers, test answers, shuffles, ... of 6 training prompts
    probes = build_probe_set(prefs, ProbeRecipe(n_examples=6, selection="first",
                                                types=("chosen", "rejected", "irr_train", "irr_test",
                                                       "random_permute"))).probes
    tracker = ProbeTrackingCallback(probes, args.store, run_id="example.sft", phase="sft", eval_every=2,
                                    tokenizer=tok, log=print)
    data = Dataset.from_dict({"prompt": train["prompt"].to_list(), "completion": train["chosen"].to_list()})
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, peft_config=peft_config,
                             callbacks=[tracker],
                             args=SFTConfig(output_dir=out, max_steps=6, per_device_train_batch_size=4,
                                            learning_rate=5e-3, logging_steps=1, save_strategy="no",
                                            report_to="none", bf16=False, gradient_checkpointing=False,
                                            use_cpu=True, disable_tqdm=True,
                                            # several CPU processes (torchrun): gloo joins them
                                            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None))
        trainer.train()

    if trainer.is_world_process_zero():
        glob = str(Path(args.store).resolve() / "trajectories" / "**" / "*.parquet")
        print(duckdb.sql(f"""
            select response_type, step, round(avg(logp_sum), 2) as mean_logp
            from read_parquet('{glob}', hive_partitioning = true)
            where step in (0, 6) group by all order by response_type, step"""))


if __name__ == "__main__":
    main()
