"""The tokenization contract (ldpipe.model.encoding) on the architectures users bring, against independent computations:
TRL's own tokenization (DPOTrainer and SFTTrainer datasets), a plain transformers forward per sequence, and a plain
greedy loop. Each family is tried with its own conventions, and with and without a chat template."""
from __future__ import annotations

import copy

import polars as pl
import pytest
import torch
from datasets import Dataset

import tiny_models as tm
from ldpipe.model.checkpoints import load_model_and_tokenizer
from ldpipe.model.encoding import describe_format, encode_prompt, uses_chat_template
from ldpipe.model.generate import GenerationConfig, generate
from ldpipe.model.scoring import encode_pair, encode_preference, encode_probes, score_probes
from ldpipe.training.trl_run import trl_columns

PROMPTS = ["\n\nHuman: What is the capital of France?\n\nAssistant:",
           "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?\n\nAssistant:",
           "Question: where is the ca"]          # a plain prompt that ends mid-word: tokens merge across the boundary
RESPONSES = [" The capital of France is Paris.", " Nine minutes, then cold water.", "t? It sat on the mat."]
REJECTED = [" It is Rome, I think.", " A day.", " dog? It is in the garage."]   # the third pair cuts apart
CASES = [(f, t) for f in tm.FAMILIES for t in ("none", "template")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-archs")


def _load(family, root, template: str):
    """The family's model and tokenizer; `template`: "none" scores plain text, "template" the family's own chat
    template, or ChatML installed for a family that has none."""
    model, tok = load_model_and_tokenizer(tm.checkpoint(family, root))
    if template == "template" and not tok.chat_template:
        tok.chat_template = tm.CHATML
    return model, tok, "none" if template == "none" else "auto"


def _trl_args(tmp_path, cls):
    return cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=3, max_steps=1, report_to="none",
               use_cpu=True, disable_tqdm=True, save_strategy="no", bf16=False, max_length=None)


@pytest.mark.parametrize("family,template", CASES)
def test_tokens_equal_trls_dpo_and_sft_tokenization(family, template, root, tmp_path):
    """ldpipe's (prompt, response) ids are TRL's for the same example: DPOTrainer's prompt_ids/chosen_ids/rejected_ids
    and SFTTrainer's input_ids split by its completion mask; plain text for `none`, conversational data for a
    template (TRL renders that with the template, as ldpipe does)."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    model, tok, setting = _load(family, root, template)
    chat = uses_chat_template(tok, setting)
    assert chat == (template == "template")
    examples = list(zip(PROMPTS, RESPONSES, REJECTED))
    dpo = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), processing_class=tok,
                     args=_trl_args(tmp_path, DPOConfig), train_dataset=Dataset.from_dict(
                         trl_columns(examples, "dpo", chat=chat)))
    sft = SFTTrainer(model=copy.deepcopy(model), processing_class=tok, args=_trl_args(tmp_path, SFTConfig),
                     train_dataset=Dataset.from_dict(trl_columns([e[:2] for e in examples], "sft", chat=chat)))
    big = dict(max_prompt_tokens=10_000, max_response_tokens=10_000, chat_template=setting)
    cuts_apart = 0
    for i, (p, c, r) in enumerate(examples):
        row = dpo.train_dataset[i]   # TRL cuts a pair after the shorter of its two common prefixes, as ldpipe does
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == encode_preference(tok, p, c, r, **big)
        pc, cc = encode_pair(tok, p, c, **big)
        cuts_apart += pc != encode_pair(tok, p, r, **big)[0]
        s = sft.train_dataset[i]
        n = next(k for k, lab in enumerate(s["labels"]) if lab != -100)   # SFT's loss starts at the completion
        assert (s["input_ids"][:n], s["input_ids"][n:]) == (pc, cc), (family, template, i)
    assert cuts_apart == (0 if chat else 1)   # plain text: the mid-word prompt's pair is cut at the shorter prefix
    bos = tok.bos_token_id
    first = encode_pair(tok, PROMPTS[0], RESPONSES[0], chat_template=setting)[0][0]
    if family in ("mistral", "gemma") or family == "llama" and not chat:
        # BOS-adding tokenizers put exactly one BOS first, and so do Mistral's and Gemma's templates, which write it
        # (a template that writes none, ChatML here, gets none: TRL renders the same way)
        assert first == bos and encode_pair(tok, PROMPTS[0], RESPONSES[0], **big)[0][1] != bos
    elif not chat:                       # no BOS added (GPT-2, Pythia: bos = eos is never put first; Qwen: no BOS)
        assert first != bos
    assert ("chat template" in describe_format(tok, setting)) == chat


@pytest.mark.parametrize("family,template", CASES)
def test_scores_equal_a_plain_forward_per_sequence(family, template, root):
    """score_probes (shared prompt cache, left-padded batches, explicit positions) equals log_softmax of one plain
    forward of prompt + response per sequence, to 1e-5 nats."""
    model, tok, setting = _load(family, root, template)
    rows = [(f"e{i}", t, p, y) for i, p in enumerate(PROMPTS)
            for t, y in (("chosen", RESPONSES[i]), ("rejected", REJECTED[i]), ("other", RESPONSES[(i + 1) % 3]))]
    probes = pl.DataFrame(rows, schema=["example_id", "response_type", "prompt", "response"], orient="row")
    enc = encode_probes(tok, probes, max_prompt_tokens=48, max_response_tokens=24, chat_template=setting)
    got = {(r["example_id"], r["response_type"]): r["logp_sum"]
           for r in score_probes(model, enc, max_batch_tokens=64).iter_rows(named=True)}
    want = {}
    with torch.no_grad():
        for ep in enc:
            for t, r in zip(ep.response_types, ep.response_ids):
                ids = torch.tensor([ep.prompt_ids + r])
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                n = len(ep.prompt_ids)
                want[(ep.example_id, t)] = float(sum(lp[n - 1 + k, tok_id] for k, tok_id in enumerate(r)))
    assert got.keys() == want.keys() and len(got) == 9
    for k in want:
        assert abs(got[k] - want[k]) < 1e-5, (family, template, k, got[k], want[k])


@pytest.mark.parametrize("family,template", CASES)
def test_greedy_generation_equals_a_plain_argmax_loop(family, template, root):
    """generate() (left-padded batch, the contract's prompt ids) gives, per prompt, what an unpadded argmax loop over
    the same prompt ids gives."""
    model, tok, setting = _load(family, root, template)
    cfg = GenerationConfig(max_new_tokens=6, max_prompt_tokens=40, chat_template=setting)
    got = generate(model, tok, PROMPTS, cfg)
    eos = tok.eos_token_id
    for p, text in zip(PROMPTS, got):
        ids = encode_prompt(tok, p, chat=uses_chat_template(tok, setting), max_prompt_tokens=40)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
        assert text == tok.decode(out, skip_special_tokens=True).strip(), (family, template, p)


def test_prompt_truncation_keeps_the_bos(root):
    """Llama's BOS survives left-truncation of a long prompt; the response keeps its first tokens and EOS."""
    _, tok, _ = _load("llama", root, "none")
    p, r = encode_pair(tok, PROMPTS[1] * 5, RESPONSES[0] * 5, max_prompt_tokens=8, max_response_tokens=5)
    full_p, full_r = encode_pair(tok, PROMPTS[1] * 5, RESPONSES[0] * 5, max_prompt_tokens=10_000,
                                 max_response_tokens=10_000)
    assert len(p) == 8 and p[0] == tok.bos_token_id and p[1:] == full_p[-7:]
    assert r == full_r[:4] + [tok.eos_token_id]


def test_a_templated_response_ends_in_the_templates_end_of_turn(root):
    """Qwen2.5-base style: EOS <|endoftext|>, ChatML closing turns with <|im_end|>. The turn's end is <|im_end|>, a
    truncated response gets it, generation stops at it, and `ldpipe check`'s line names it."""
    from ldpipe.model.encoding import end_of_turn_id, stop_ids

    _, tok, _ = _load("qwen2", root, "template")
    tok.eos_token = "<|endoftext|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok, chat=True) == im_end != tok.eos_token_id
    assert end_of_turn_id(tok, chat=False) == tok.eos_token_id
    assert im_end in stop_ids(tok, chat=True) and tok.eos_token_id in stop_ids(tok, chat=True)
    _, r = encode_pair(tok, PROMPTS[0], RESPONSES[0] * 5, max_response_tokens=6)
    assert len(r) == 6 and r[-1] == im_end
    assert "ending in '<|im_end|>'" in describe_format(tok, "auto")


def test_a_template_that_refuses_the_messages_says_what_to_do(root):
    """A template with its own checks (Gemma's: no system turn) raises a clear error naming the roles and the
    setting that scores the text as written, not jinja's bare TemplateError."""
    from ldpipe.errors import LdpipeError

    _, tok, _ = _load("llama", root, "none")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(LdpipeError, match=r"roles \['system', 'user'\].*System role not supported.*chat_template: none"):
        encode_pair(tok, "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello.")


def test_the_builtin_model_encodes_as_before():
    """The builtin tokenizer adds no BOS and has no template, and the synthetic world's prompts end in 'Assistant:'
    before a space-led reply: the contract gives exactly the ids of the reference's separate tokenization (prompt and
    response apart, no special tokens, EOS appended) on the default probe set, so its runs score as before."""
    from ldpipe.bench.common import probe_frame, tokenizer

    tok, pf = tokenizer(), probe_frame(40)
    texts = {(e, t): (p, r) for e, t, p, r in pf.select("example_id", "response_type", "prompt", "response").rows()}
    enc = encode_probes(tok, pf, max_prompt_tokens=96, max_response_tokens=64)
    assert sum(len(ep.response_ids) for ep in enc) == pf.height == 440
    for ep in enc:
        for t, r in zip(ep.response_types, ep.response_ids):
            prompt, resp = texts[(ep.example_id, t)]
            assert ep.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"][-96:]
            assert r == tok(resp, add_special_tokens=False)["input_ids"][:63] + [tok.eos_token_id]
