"""`trainer: trl`: a declared run trained by Hugging Face TRL (SFTTrainer, DPOTrainer) with ldpipe's tracking
callback, so the same YAML run (SFT, DPO, IPO, cDPO, `start_from` chains, `lora:`) can run on the trainer most
researchers use, and still record every probe's log-probability in the store.

What carries over from ldpipe's own loop (ldpipe.training.loop): the start checkpoint, the optimizer (AdamW with betas
(0.9, 0.95) and no weight decay, or RMSprop), lr with linear warmup then constant, gradient clipping, the number
of optimizer steps (epochs x ceil(examples / batch_size)), the seed, the final checkpoint's folder and metadata, and
the store rows (ldpipe.training.callback). What is TRL's own: the data order (the Trainer's seeded sampler), the SFT loss
(the mean NLL over completion tokens, where ldpipe sums over each sequence; the README's "Agreement with TRL"
gives each convention), and truncation (the sequence's end is kept, `max_prompt_tokens + max_response_tokens`).
Resume: TRL's own checkpoints every `checkpoint_every` steps under `<run dir>/trl/`, continued on a rerun.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from ldpipe.data.transcript import text_to_reply, transcript_to_messages
from ldpipe.errors import LdpipeError
from ldpipe.model.encoding import uses_chat_template
from ldpipe.layout import FINAL_DIR
from ldpipe.spec import RunSpec
from ldpipe.store.shards import Store
from ldpipe.training import distributed
from ldpipe.training.callback import ProbeTrackingCallback


def trl_args(run: RunSpec, out_dir: Path, total_steps: int, max_length: int, device: Any) -> dict:
    """The TrainingArguments shared by TRL's SFT and DPO configs, from the run's declaration."""
    world = distributed.world_size()
    if run.batch_size % world:
        raise LdpipeError(f"run {run.name!r}: batch_size {run.batch_size} is not divisible by the {world} "
                          "processes (each takes an equal share of every batch)")
    checkpoint_every = run.eval_every if run.checkpoint_every is None else run.checkpoint_every
    return dict(
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=run.batch_size // world, max_steps=total_steps,
        learning_rate=run.lr,   # the warmup schedule is ldpipe's (_ldpipe_warmup)
        optim="adamw_torch" if run.optimizer == "adamw" else "rmsprop", adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=run.max_grad_norm or 0.0, seed=run.seed, data_seed=run.seed,
        logging_steps=1, report_to="none", disable_tqdm=True, bf16=run.autocast == "bf16",
        use_cpu=str(device).startswith("cpu"), save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or 1, save_total_limit=1, save_only_model=False, max_length=max_length,
        truncation_mode="keep_end", dataloader_drop_last=False, remove_unused_columns=True,
        gradient_checkpointing=False)


def trl_columns(examples: Sequence[tuple[str, ...]], algo: str, *, chat: bool) -> dict[str, list]:
    """TRL's dataset columns for ldpipe's (prompt, response[, rejected]) text examples: standard (plain text, which TRL
    tokenizes as ldpipe's `chat_template: none` does) or, for a model whose chat template ldpipe renders with,
    conversational (prompt messages, each response an assistant message), so both trainers see the same tokens."""
    names = ("prompt", "completion") if algo == "sft" else ("prompt", "chosen", "rejected")
    if not chat:
        return {n: [e[i] for e in examples] for i, n in enumerate(names)}
    cols: dict[str, list] = {"prompt": [transcript_to_messages(e[0]) for e in examples]}
    for i, n in enumerate(names[1:], 1):
        cols[n] = [[{"role": "assistant", "content": text_to_reply(e[i])}] for e in examples]
    return cols


def _preference_loss(run: RunSpec) -> dict:
    """DPOConfig loss settings for the run's algo. TRL 1.16's "sigmoid" loss ignores label_smoothing, so cDPO
    (eps > 0) is the weighted pair sigmoid + robust: (2-2eps)*sigmoid - (1-2eps)*robust equals
    -(1-eps) log s(z) - eps log s(-z) exactly (tests/test_trl_agreement.py). IPO is TRL's, which divides each
    log-ratio by its completion's length (ldpipe's IPO sums; README "Agreement with TRL")."""
    if run.algo == "ipo":
        return {"loss_type": ["ipo"]}
    eps = run.label_smoothing
    if not eps:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 - 2 * eps, -(1 - 2 * eps)], "label_smoothing": eps}


def run_trl(run: RunSpec, *, run_id: str, config_hash: str, model_path: Path | str,
            examples: Sequence[tuple[str, ...]], probes: pl.DataFrame, store: Store, out_dir: Path,
            max_prompt_tokens: int, max_response_tokens: int, chat_template: str = "auto", device: str = "auto",
            step_offset: int = 0,
            checkpoint_metadata: dict | None = None, log=print):
    """Train `run` with TRL from `model_path`, tracking `probes`; returns ldpipe.training.loop.TrainResult."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from ldpipe.model.checkpoints import load_model_and_tokenizer, save_checkpoint
    from ldpipe.model.lora import apply_lora, is_peft
    from ldpipe.training.loop import TrainResult, begin_run
    from ldpipe.training.optim_state import save_optimizer_state
    from ldpipe.training.record import keep_other_config

    t0, out_dir, dev = begin_run(run, run_id, examples, out_dir, device)
    model, tok = load_model_and_tokenizer(model_path, device=dev)
    if run.lora is not None:
        model = apply_lora(model, run.lora, model_path, seed=run.seed)
    total_steps = run.total_steps(len(examples))
    args = trl_args(run, out_dir, total_steps, max_prompt_tokens + max_response_tokens, dev)
    callback = ProbeTrackingCallback(probes, store, run_id=run_id, config_hash=config_hash, phase=run.algo,
                                     eval_every=run.eval_every, tokenizer=tok, max_prompt_tokens=max_prompt_tokens,
                                     max_response_tokens=max_response_tokens, chat_template=chat_template, log=log)
    resume_from = _resume_point(out_dir / "trl", config_hash)
    if resume_from is None and distributed.is_main():
        keep_other_config(store, out_dir, run_id, config_hash, log)
    data = Dataset.from_dict(trl_columns(examples, run.algo, chat=uses_chat_template(tok, chat_template)))
    if run.algo == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**args, completion_only_loss=True), train_dataset=data,
                             processing_class=tok, callbacks=[callback])
    else:
        # the reference is the start checkpoint, frozen (for a LoRA chain: base + the parent's adapter, not the base)
        ref, _ = load_model_and_tokenizer(model_path, device=dev)
        if is_peft(ref):   # TRL patches the reference's transformers forward: fold the adapter into the weights
            ref = ref.merge_and_unload()
        ref.requires_grad_(False)
        cfg = DPOConfig(**args, beta=run.beta, disable_dropout=True, **_preference_loss(run))
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok,
                             callbacks=[callback])
    _ldpipe_warmup(trainer, run.warmup_steps)
    fix_resume_weights(trainer)
    log(f"[{run_id}] TRL {type(trainer).__name__}: {total_steps} steps, {len(examples)} examples, batch "
        f"{run.batch_size} over {distributed.world_size()} process(es){'; resuming from ' + str(resume_from) if resume_from else ''}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = out_dir / FINAL_DIR
    if distributed.is_main():
        _write_identity(out_dir / "trl", config_hash)
        meta = {**(checkpoint_metadata or {}), "run_id": run_id, "config_hash": config_hash, "algo": run.algo,
                "steps": total_steps, "step_offset": step_offset, "precision": "bf16-autocast" if args["bf16"]
                else "fp32", "trainer": "trl"}
        save_checkpoint(trainer.model, tok, final, metadata=meta,
                        # accelerate wraps the torch optimizer; its state is the preconditioner influence uses
                        extra=lambda d: save_optimizer_state(trainer.model, getattr(trainer.optimizer, "optimizer",
                                                                                    trainer.optimizer), d))
    traj = store.read("trajectories", run_id=run_id)
    metrics = store.read("train_metrics", run_id=run_id)
    last_row = metrics.sort("step").row(-1, named=True) if metrics.height else {"loss": float("nan")}
    return TrainResult(run_id=run_id, checkpoint=final, steps=total_steps, step_offset=step_offset,
                       evals=traj["step"].n_unique(), wall_s=time.perf_counter() - t0, device=str(dev),
                       final_loss=float(last_row["loss"]), first_eval=traj.filter(pl.col("step") == 0),
                       last_eval=traj.filter(pl.col("step") == traj["step"].max()), final_metrics=dict(last_row),
                       resumed_from=int(resume_from.name.split("-")[-1]) if resume_from else None,
                       precision=meta["precision"] if distributed.is_main() else "fp32")


def fix_resume_weights(trainer: Any) -> None:
    """Make `trainer.train(resume_from_checkpoint=...)` restore every weight of models whose saved names differ
    from their parameter names. transformers 5 saves GPT-NeoX's (Pythia's) output layer as `embed_out.weight` but
    the Trainer's resume loads the file without the name mapping, so `lm_head.weight` silently stays as it was
    (it warns "missing keys"): the resumed run trains a different model. This reloads such a checkpoint through
    `from_pretrained`, which maps the names. Adapter checkpoints (peft) are not affected."""
    from safetensors import safe_open

    from ldpipe.model.lora import is_peft

    original = trainer._load_from_checkpoint

    def load(resume_from_checkpoint: str, model: Any = None) -> None:
        original(resume_from_checkpoint, model)
        target = model if model is not None else trainer.model
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        if is_peft(target) or not weights.is_file():
            return
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        if saved == set(target.state_dict()):
            return
        fresh = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
        target.load_state_dict(fresh.state_dict())

    trainer._load_from_checkpoint = load


def _ldpipe_warmup(trainer: Any, warmup: int) -> None:
    """ldpipe's schedule, lr x min(1, (s+1)/(warmup+1)): transformers' constant_with_warmup gives the first step
    lr 0, a lost step in a short run."""
    import torch

    def create_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
        if trainer.lr_scheduler is None:
            trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or trainer.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


_IDENTITY = "ldpipe_config_hash"


def _write_identity(trl_dir: Path, config_hash: str) -> None:
    trl_dir.mkdir(parents=True, exist_ok=True)
    (trl_dir / _IDENTITY).write_text(config_hash)


def _resume_point(trl_dir: Path, config_hash: str) -> Path | None:
    """TRL's newest checkpoint of this configuration (None: start fresh, and TRL's old checkpoints go)."""
    import shutil

    ident = trl_dir / _IDENTITY
    ckpts = sorted(trl_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if trl_dir.is_dir() else []
    if ckpts and ident.is_file() and ident.read_text() == config_hash and not (trl_dir.parent / FINAL_DIR).exists():
        return ckpts[-1]
    if trl_dir.is_dir() and distributed.is_main():
        shutil.rmtree(trl_dir)
    _write_identity(trl_dir, config_hash) if distributed.is_main() else None
    return None
