"""Probe tracking inside your own TRL DPOTrainer script, on conversational data with a chat template, without Dagster.

The data is TRL's conversational preference format (examples/own_data/chat_prefs.jsonl: `prompt` a list of
{role, content} messages, `chosen` / `rejected` one assistant message each). TRL reads the file as it is; ldpipe reads
the same file for the probe set, and its callback renders every probe with the tokenizer's chat template
(`chat_template="auto"`), exactly as TRL rendered the training data. The check at the end shows it: the tracked
log-probability of y+ after k steps equals TRL's own `logps/chosen` of step k + 1 (same weights, same batch).

    .venv/bin/python examples/trl_dpo_chat.py                       # a tiny model built here, offline (seconds)
    .venv/bin/python examples/trl_dpo_chat.py --model ./my-chat-model # a local checkpoint with a chat template
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

import polars as pl
from datasets import load_dataset
from trl import DPOConfig, DPOTrainer

from ldpipe.data.loaders import load_local
from ldpipe.model.checkpoints import load_model_and_tokenizer
from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer
from ldpipe.probes.build import ProbeRecipe, build_probe_set
from ldpipe.store.shards import Store
from ldpipe.training.callback import ProbeTrackingCallback

HERE = Path(__file__).resolve().parent
DATA = HERE / "own_data" / "chat_prefs.jsonl"
# A Zephyr-style template for the demo tokenizer: a role header line, the message, EOS closing each turn.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
N = 6   # training prompts = probe prompts, one batch: TRL's batch mean is then the probe set's mean


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local Hugging Face model folder with a chat template (default: a tiny one)")
    ap.add_argument("--store", default=".ldpipe/trl_dpo_chat/store", help="the ldpipe store to write")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    prefs = load_local(DATA, splits=("train", "test"), columns={"example_id": "id"})   # TRL's format, read as is
    train_ids = prefs.filter(pl.col("split") == "train")["example_id"].head(N).to_list()
    if args.model:
        model, tok = load_model_and_tokenizer(args.model)
        if not tok.chat_template:
            sys.exit(f"{args.model}: its tokenizer has no chat template; this example is about templated models")
    else:   # offline: a BPE tokenizer with the template above and a 2-layer GPT-NeoX (no pretraining: a demo)
        tok = train_tokenizer([*prefs["prompt"], *prefs["chosen"], *prefs["rejected"]], vocab_size=400)
        tok.chat_template = TEMPLATE
        model = build_model(TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
                            vocab_size=len(tok))

    # the probe set of the N training prompts: y+, y-, other prompts' answers, test answers, word shuffles
    probes = build_probe_set(prefs.filter(pl.col("example_id").is_in(train_ids) | (pl.col("split") == "test")),
                             ProbeRecipe(n_examples=N, selection="first",
                                         types=("chosen", "rejected", "irr_train", "irr_test", "random_permute"))
                             ).probes
    tracker = ProbeTrackingCallback(probes, args.store, run_id="example.dpo", phase="dpo", eval_every=1,
                                    tokenizer=tok, chat_template="auto", log=print)
    data = load_dataset("json", data_files=str(DATA), split="train").filter(lambda r: r["id"] in train_ids)
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), processing_class=tok, train_dataset=data.remove_columns(["id", "split"]),
                             callbacks=[tracker],
                             args=DPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=N,
                                            learning_rate=5e-3, beta=0.1, logging_steps=1, save_strategy="no",
                                            report_to="none", bf16=False, use_cpu=True, disable_tqdm=True))
        trainer.train()

    # TRL's logps/chosen of step k+1 is computed before that step's update: ldpipe's tracked step k
    trl = {h["step"] - 1: h["logps/chosen"] for h in trainer.state.log_history if "logps/chosen" in h}
    traj = Store(Path(args.store)).read("trajectories", run_id="example.dpo")
    ours = dict(traj.filter(pl.col("response_type") == "chosen").group_by("step")
                .agg(pl.col("logp_sum").mean()).iter_rows())
    worst = 0.0
    for step in sorted(trl):
        diff = abs(ours[step] - trl[step])
        worst = max(worst, diff)
        print(f"step {step}: tracked mean log p(y+) {ours[step]:.5f}, TRL logps/chosen {trl[step]:.5f}, "
              f"|diff| {diff:.1e}")
    print(f"largest difference {worst:.1e} nats over {len(trl)} steps "
          f"({'equal to 1e-4' if worst < 1e-4 else 'NOT equal to 1e-4'})")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
