"""ldpipe's losses and per-sequence log-probs against Hugging Face TRL's (DPOTrainer / SFTTrainer), on one tiny model.

Each test builds a real TRL trainer on a tiny GPT-NeoX and an in-memory dataset, takes one collated batch from the
trainer's own dataloader, and runs the trainer's own loss (`compute_loss`) and per-sequence log-prob code
(`DPOTrainer.compute_ref_log_probs`, which is the forward `compute_loss` uses, called with the policy or the
reference). The reference is a perturbed copy of the policy, so every margin is non-zero.

What agrees, as is (`pi` = log pi(y|x) summed over the response tokens, EOS included, prompt excluded):
- Per-sequence log-probs: TRL's chosen/rejected log-probs equal ldpipe's `batch_logps` and `score_probes`
  `logp_sum`, and TRL's completion-token count equals ldpipe's `n_tokens`, when the data are alike: TRL appends
  the EOS *string* to a non-conversational chosen/rejected/completion that does not end in it (ldpipe appends the EOS
  id), and tokenizes prompt + response as ONE string, taking the completion from where that diverges from the prompt
  alone; ldpipe tokenizes them separately. The two give the same ids iff the prompt ends on a pre-token boundary
  (asserted on the data here; `test_tokenization_differs_when_the_prompt_ends_mid_word` shows the other case).
- DPO (`loss_type=["sigmoid"]`): TRL's loss == ldpipe `dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)`, and TRL's logged
  rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies == ldpipe `reward_stats`.

Convention differences (each asserted below after the conversion, and that without it the values differ):
- cDPO. TRL 1.16's "sigmoid" loss does not read `label_smoothing` (only "robust", "exo_pair", "aot*" do): with
  `loss_type=["sigmoid"], label_smoothing=eps` TRL trains plain DPO. ldpipe's `dpo_loss(..., label_smoothing=eps)` is
  cDPO, -(1-eps) log sigma(z) - eps log sigma(-z), z = beta * m. Since log sigma(z) - log sigma(-z) = z:
      ldpipe_cdpo(eps) = TRL_sigmoid + eps * beta * mean(m) = TRL_sigmoid + eps * TRL's rewards/margins,
  and, as one TRL run: `loss_type=["sigmoid", "robust"], loss_weights=[2 - 2 eps, -(1 - 2 eps)],
  label_smoothing=eps` gives exactly ldpipe's cDPO. TRL's "robust" alone is rDPO,
  [-(1-eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps), not cDPO.
- IPO. TRL divides each log-ratio by its completion token count n (EOS included; clamped at 1) before the margin:
      TRL_ipo = mean((pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r - 1/(2 beta))^2
              = ldpipe ipo_loss(pi_c/n_c, pi_r/n_r, ref_c/n_c, ref_r/n_r, beta);
  ldpipe's `ipo_loss` on summed log-probs (the DPO codebase's convention) is a different loss whose beta means
  something else (target margin 1/(2 beta) nats per sequence, not per token).
- SFT. TRL's loss is the token mean over the whole batch (completion tokens only, EOS included, for a
  prompt/completion dataset; `num_items_in_batch` in a training step makes it the token count of the whole
  gradient-accumulation step): TRL_sft = -sum_i pi_i / sum_i n_i. ldpipe's `sft_loss` is the mean over sequences of
  the summed NLL: -sum_i pi_i / B. So TRL_sft = ldpipe_sft * B / sum_i n_i.
- Truncation. TRL's `max_length` (default 1024) cuts prompt + completion from the end (`keep_start`), so a cut
  completion loses its EOS; ldpipe keeps the prompt's last tokens and the response's first ones, then EOS.
- Precision. TRL's fused LM head always computes the log-softmax in fp32 and sums in fp32 (its per-sequence
  log-probs are fp32 even for a float64 model); ldpipe casts logits to fp32 too and sums in float64. The model here
  is float64 so that both sides share every step but the fp32 log-softmax: log-probs agree to rel 1e-6; losses
  recomputed by ldpipe in float64 from TRL's own per-sequence log-probs agree with TRL's fp32 loss to abs 1e-6.
  TRL's configs default to bf16=True (autocast, also on CPU) and gradient checkpointing; both are off here.
"""
from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer  # noqa: E402
from ldpipe.model.scoring import EncodedProbe, batch_logps, encode_pair, score_probes  # noqa: E402
from ldpipe.training.losses import dpo_loss, ipo_loss, reward_stats, sft_loss  # noqa: E402

torch.set_num_threads(1)
# transformers 5 renames gradient_checkpointing (set here, and read by TRL) and score_probes' past_key_values
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Every prompt ends on a pre-token boundary (":" or a word) and every response starts with a space, so tokenizing
# prompt + response as one string (TRL) and separately (ldpipe) gives the same ids. Lengths differ within each pair,
# so length normalisation (IPO, SFT) changes the values.
PROMPTS = [
    "Question: where is the cat?\nAnswer:",
    "Question: what is red?\nAnswer:",
    "the dog is",
    "Question: who sat on the mat?\nAnswer:",
]
CHOSEN = [" the cat sat on the mat.", " the apple is red.", " in the park.", " the cat."]
REJECTED = [" the dog.", " the mat is red and the cat is in the park.", " red.", " the dog sat on the red apple."]
CORPUS = ([p + c for p, c in zip(PROMPTS, CHOSEN)] + [p + r for p, r in zip(PROMPTS, REJECTED)]) * 10

# Per-sequence log-probs, relative: both sides take an fp32 log-softmax, and TRL sums it in fp32; the sums here are
# -18 to -93 nats (fp32 ulp up to 8e-6) and differ by at most ~4e-6 (~1e-7 relative), so 1e-6 absolute is out of reach.
REL = 1e-6
# Losses, absolute: ldpipe in float64 on TRL's own fp32 per-sequence log-probs, against TRL's fp32 loss (values O(1);
# the differences measured are ~1e-8).
ABS = 1e-6


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def models(tokenizer):
    """(policy, reference), float64. The policy's matrices are scaled up so that the logits are far from uniform (an
    off-by-one position would change the log-probs by whole nats); the reference is the policy plus noise."""
    pol = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                      max_position_embeddings=128), vocab_size=len(tokenizer)).double()
    g = torch.Generator().manual_seed(1)
    ref = copy.deepcopy(pol)
    with torch.no_grad():
        for p in pol.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
        for p, q in zip(ref.parameters(), pol.parameters()):
            p.copy_(q + 0.3 * q.abs().mean() * torch.randn(q.shape, generator=g, dtype=q.dtype))
    return pol, ref


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """ldpipe's (prompt_ids, response_ids) per example: chosen and rejected."""
    enc = lambda p, r: encode_pair(tokenizer, p, r)  # noqa: E731
    return ([enc(p, c) for p, c in zip(PROMPTS, CHOSEN)], [enc(p, r) for p, r in zip(PROMPTS, REJECTED)])


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, gradient_checkpointing=False,
                use_cpu=True, per_device_train_batch_size=len(PROMPTS), max_length=None, seed=0)


def _dpo_trainer(models, tokenizer, tmp_path, **cfg) -> DPOTrainer:
    pol, ref = models
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = DPOConfig(**_common(tmp_path), **cfg)
    # Fresh copies: the trainer patches its models' forward (fused LM head).
    return DPOTrainer(model=copy.deepcopy(pol), ref_model=copy.deepcopy(ref), args=args, train_dataset=ds,
                      processing_class=tokenizer)


def _rows(input_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]


def _order(trl_rows: list[list[int]], pairs: list[tuple[list[int], list[int]]]) -> list[int]:
    """For each batch row (TRL's shuffled order), the example whose ldpipe prompt + response ids it is, exactly."""
    want = [p + r for p, r in pairs]
    order = []
    for row in trl_rows:
        hits = [i for i, w in enumerate(want) if w == row]
        assert len(hits) == 1, f"TRL row {row} is not exactly one ldpipe encoding {want}"
        order.append(hits[0])
    assert sorted(order) == list(range(len(pairs)))
    return order


def _dpo_batch(tr: DPOTrainer, pairs):
    """One batch from the trainer's dataloader, TRL's per-sequence log-probs (policy and reference) and token counts,
    and the example order, after checking that TRL's ids and completion masks are ldpipe's encodings."""
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    chosen, rejected = pairs
    B = len(chosen)
    ids, att, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    order = _order(_rows(ids[:B], att[:B]), chosen)
    assert _order(_rows(ids[B:], att[B:]), rejected) == order          # chosen row i and rejected row B+i: one pair
    completions = _rows(ids, comp)                                      # TRL's completion = ldpipe's response + EOS
    assert completions == [chosen[i][1] for i in order] + [rejected[i][1] for i in order]
    assert all(c[-1] == tr.processing_class.eos_token_id for c in completions)
    with torch.no_grad():
        pol_c, pol_r = (x.double() for x in tr.compute_ref_log_probs(tr.model, inputs))
        ref_c, ref_r = (x.double() for x in tr.compute_ref_log_probs(tr.ref_model, inputs))
    n_c, n_r = (x.sum(1).double() for x in comp.chunk(2))
    return inputs, order, (pol_c, pol_r, ref_c, ref_r), (n_c, n_r)


def _trl_loss(tr: DPOTrainer, inputs) -> float:
    loss = tr.compute_loss(tr.model, inputs)
    return loss.item()


# --------------------------------------------------------------------------- per-sequence log-probs


def test_trl_logps_equal_ldpipe_batch_logps_and_score_probes(models, tokenizer, pairs, tmp_path):
    tr = _dpo_trainer(models, tokenizer, tmp_path)
    _, order, (pol_c, pol_r, ref_c, ref_r), (n_c, n_r) = _dpo_batch(tr, pairs)
    chosen, rejected = pairs
    for model, trl_c, trl_r in ((models[0], pol_c, pol_r), (models[1], ref_c, ref_r)):
        # batch_logps: one right-padded batch of all chosen then all rejected, in TRL's row order
        ours, n = batch_logps(model, [chosen[i] for i in order] + [rejected[i] for i in order])
        theirs = torch.cat([trl_c, trl_r])
        assert n.tolist() == torch.cat([n_c, n_r]).long().tolist()
        torch.testing.assert_close(ours.double(), theirs, rtol=REL, atol=0.0)
        # score_probes: prefix-shared fast path, one probe per prompt with both responses
        enc = [EncodedProbe(example_id=str(i), prompt_ids=chosen[i][0], response_types=["chosen", "rejected"],
                            response_ids=[chosen[i][1], rejected[i][1]]) for i in order]
        frame = score_probes(model, enc)
        lp = torch.tensor(frame["logp_sum"].to_list(), dtype=torch.float64).view(-1, 2)
        torch.testing.assert_close(lp[:, 0], trl_c, rtol=REL, atol=0.0)
        torch.testing.assert_close(lp[:, 1], trl_r, rtol=REL, atol=0.0)
        assert frame["n_tokens"].to_list() == [int(k) for pair in zip(n_c, n_r) for k in pair]
    # the comparison has teeth: policy and reference differ by far more than the tolerance
    assert (pol_c - ref_c).abs().min() > 1e-2 and (pol_r - ref_r).abs().min() > 1e-2


# --------------------------------------------------------------------------- DPO, cDPO, IPO


def test_dpo_sigmoid_loss_and_reward_stats_equal_trl(models, tokenizer, pairs, tmp_path):
    beta = 0.1
    tr = _dpo_trainer(models, tokenizer, tmp_path, beta=beta, loss_type=["sigmoid"])
    inputs, _, logps, _ = _dpo_batch(tr, pairs)
    theirs = _trl_loss(tr, inputs)
    ours, stats = dpo_loss(*logps, beta)
    assert ours.item() == pytest.approx(theirs, abs=ABS)
    assert abs(ours.item() - 0.6931471805599453) > 1e-3        # policy != reference: not the log 2 of a zero margin
    logged = {k: v[-1] for k, v in tr._metrics["train"].items()}
    for key, value in reward_stats(*logps, beta).items():
        assert logged[key] == pytest.approx(value.item(), abs=ABS), key
    assert stats["rewards/margins"].item() == pytest.approx(logged["rewards/margins"], abs=ABS)
    # TRL's logged mean log-probs come from compute_loss's own forward: the same numbers as compute_ref_log_probs
    assert logged["logps/chosen"] == pytest.approx(logps[0].mean().item(), rel=REL)
    assert logged["logps/rejected"] == pytest.approx(logps[1].mean().item(), rel=REL)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_is_trl_sigmoid_plus_eps_times_margin_not_trl_label_smoothing(models, tokenizer, pairs, tmp_path,
                                                                           eps):
    beta = 0.5
    # TRL "sigmoid" with label_smoothing=eps: plain DPO, label_smoothing unread
    tr = _dpo_trainer(models, tokenizer, tmp_path, beta=beta, loss_type=["sigmoid"], label_smoothing=eps)
    inputs, order, logps, _ = _dpo_batch(tr, pairs)
    trl_sigmoid = _trl_loss(tr, inputs)
    margins = tr._metrics["train"]["rewards/margins"][-1]              # beta * mean(m)
    plain = dpo_loss(*logps, beta)[0].item()
    cdpo = dpo_loss(*logps, beta, label_smoothing=eps)[0].item()
    assert trl_sigmoid == pytest.approx(plain, abs=ABS)
    assert abs(cdpo - trl_sigmoid) > 1e-3
    # the conversion: ldpipe cDPO = TRL sigmoid + eps * TRL's logged rewards/margins
    assert cdpo == pytest.approx(trl_sigmoid + eps * margins, abs=ABS)
    # ... and as one TRL configuration: (2 - 2 eps) * sigmoid - (1 - 2 eps) * robust
    tr2 = _dpo_trainer(models, tokenizer, tmp_path, beta=beta, loss_type=["sigmoid", "robust"],
                       loss_weights=[2 - 2 * eps, -(1 - 2 * eps)], label_smoothing=eps)
    inputs2, order2, logps2, _ = _dpo_batch(tr2, pairs)
    by_example = lambda o, x: x[torch.argsort(torch.tensor(o))]  # noqa: E731
    assert all(torch.equal(by_example(order, a), by_example(order2, b)) for a, b in zip(logps, logps2))
    assert _trl_loss(tr2, inputs2) == pytest.approx(cdpo, abs=ABS)
    # TRL's "robust" alone is rDPO, not cDPO
    tr3 = _dpo_trainer(models, tokenizer, tmp_path, beta=beta, loss_type=["robust"], label_smoothing=eps)
    inputs3, _, _, _ = _dpo_batch(tr3, pairs)
    assert abs(_trl_loss(tr3, inputs3) - cdpo) > 1e-3


def test_trl_ipo_is_ldpipe_ipo_on_length_normalised_logps(models, tokenizer, pairs, tmp_path):
    beta = 0.5
    tr = _dpo_trainer(models, tokenizer, tmp_path, beta=beta, loss_type=["ipo"])
    inputs, _, (pol_c, pol_r, ref_c, ref_r), (n_c, n_r) = _dpo_batch(tr, pairs)
    assert not torch.equal(n_c, n_r)                                     # lengths differ within pairs
    theirs = _trl_loss(tr, inputs)
    normalised, _ = ipo_loss(pol_c / n_c, pol_r / n_r, ref_c / n_c, ref_r / n_r, beta)
    assert normalised.item() == pytest.approx(theirs, abs=ABS)
    summed, _ = ipo_loss(pol_c, pol_r, ref_c, ref_r, beta)
    assert abs(summed.item() - theirs) > 1e-3


# --------------------------------------------------------------------------- SFT


def test_trl_sft_is_token_mean_and_ldpipe_sft_is_sequence_sum_mean(models, tokenizer, pairs, tmp_path):
    pol = models[0]
    chosen = pairs[0]
    ds = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN})
    args = SFTConfig(**_common(tmp_path))
    tr = SFTTrainer(model=copy.deepcopy(pol), args=args, train_dataset=ds, processing_class=tokenizer)
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    ids, labels = inputs["input_ids"], inputs["labels"]
    order = _order(_rows(ids, inputs["attention_mask"]), chosen)
    # loss on the completion (ldpipe's response + EOS) only: TRL's default for prompt/completion data
    assert [row[lab != -100].tolist() for row, lab in zip(ids, labels)] == [chosen[i][1] for i in order]
    theirs = tr.compute_loss(tr.model, inputs).item()
    with torch.no_grad():
        out = tr.model(**{k: v for k, v in inputs.items() if k != "use_cache"}, fused_lm_head=True)
    trl_logp = out.log_probs.double().sum(1)                               # TRL's per-sequence summed log-probs
    ours_logp, n = batch_logps(pol, [chosen[i] for i in order])
    torch.testing.assert_close(ours_logp.double(), trl_logp, rtol=REL, atol=0.0)
    B, n_total = len(order), int(n.sum())
    assert n_total == int((labels != -100).sum()) and len(set(n.tolist())) > 1
    # TRL: -sum logp / sum n (token mean);  ldpipe: -sum logp / B (mean of per-sequence sums)
    assert theirs == pytest.approx(-trl_logp.sum().item() / n_total, abs=ABS)
    ldpipe = sft_loss(trl_logp).item()
    assert abs(ldpipe - theirs) > 1e-3
    assert theirs == pytest.approx(ldpipe * B / n_total, abs=ABS)


# --------------------------------------------------------------------------- tokenization and truncation


def test_tokenization_matches_trl_when_the_prompt_ends_mid_word(models, tokenizer, tmp_path):
    """TRL tokenizes prompt + completion as one string and starts the completion where the joint ids leave the
    prompt's own ids; ldpipe's contract does the same, so a word split across the boundary gives TRL's tokens."""
    pol, ref = models
    prompt, completion = "Question: where is the ca", "t?\nAnswer: the cat sat on the mat."
    ds = Dataset.from_dict({"prompt": [prompt], "chosen": [completion], "rejected": [completion]})
    args = DPOConfig(**{**_common(tmp_path), "per_device_train_batch_size": 1})
    tr = DPOTrainer(model=copy.deepcopy(pol), ref_model=copy.deepcopy(ref), args=args, train_dataset=ds,
                    processing_class=tokenizer)
    row = tr.train_dataset[0]
    p, r = encode_pair(tokenizer, prompt, completion)
    separate = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(p) < len(separate)                       # " cat" is one token jointly: the prompt's end moved over
    assert (row["prompt_ids"], row["chosen_ids"]) == (p, r)


def test_trl_max_length_cuts_the_end_and_drops_eos(tokenizer):
    """TRL's collator keeps the first max_length tokens of prompt + completion (keep_start), so a cut completion
    loses its EOS; ldpipe keeps the response's first max_response_tokens - 1 tokens and then EOS."""
    eos = tokenizer.eos_token_id
    p, r = encode_pair(tokenizer, PROMPTS[0], CHOSEN[0])                   # r ends in EOS
    collate = DataCollatorForPreference(pad_token_id=eos, max_length=len(p) + 3)
    out = collate([{"prompt_ids": p, "chosen_ids": r, "rejected_ids": r}])
    trl_completion = out["input_ids"][0][out["completion_mask"][0].bool()].tolist()
    assert trl_completion == r[:3] and eos not in trl_completion
    p2, r2 = encode_pair(tokenizer, PROMPTS[0], CHOSEN[0], max_response_tokens=3)
    assert p2 == p and r2 == r[:2] + [eos]
