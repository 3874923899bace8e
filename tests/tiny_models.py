"""Tiny random-init checkpoints of the architectures users bring, each with its family's tokenizer conventions.

Built offline from a transformers config and a byte-level BPE trained here, saved as a model folder that
`AutoModelForCausalLM` / `AutoTokenizer` load as they would a hub snapshot:

| family    | BOS added by tok(text) | EOS             | pad            | chat template | head   | other                     |
|-----------|------------------------|-----------------|----------------|---------------|--------|---------------------------|
| gpt_neox  | no (bos = eos)         | <|endoftext|>   | none (= eos)   | none          | untied | rotary, Pythia-style       |
| llama     | yes (<s>)              | </s>            | none (= eos)   | none          | untied | rotary                     |
| qwen2     | no (no BOS token)      | <|im_end|>      | <|endoftext|>  | ChatML        | tied   | grouped KV heads, left pad |
| gpt2      | no (bos = eos)         | <|endoftext|>   | none (= eos)   | none          | tied   | learned positions          |
| mistral   | yes (<s>)              | </s>            | none (= eos)   | [INST] + BOS  | untied | grouped KV heads           |
| gemma     | yes (<bos>)            | <eos>           | <pad>          | turns + BOS   | tied   | scaled embedding, 1 KV head|

Mistral's and Gemma's templates write the BOS themselves, as the hub's do, so a BOS added on top would be doubled;
Gemma's closes a turn with <end_of_turn> (not EOS) and refuses a system turn, as the hub's does.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

FAMILIES = ("gpt_neox", "llama", "qwen2", "gpt2", "mistral", "gemma")

_CORPUS = [
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: How do I boil an egg?\n\nAssistant: Put the egg in boiling water for nine minutes.",
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.",
    "Learning dynamics describe how an update on one example changes the model's prediction on another.",
    "Sure! Here is a short answer: it depends on the weather, the season and the time of day.",
    "I am not sure about that, but I think the answer is forty-two. Thanks for asking!",
    "user assistant system please explain why the sky is blue and the grass is green",
] * 4

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

_SPECIALS = {
    "gpt_neox": dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False, template=None),
    "llama": dict(bos="<s>", eos="</s>", pad=None, add_bos=True, template=None),
    "qwen2": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False, template=CHATML,
                  extra=["<|im_start|>"]),
    "gpt2": dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False, template=None),
    "mistral": dict(bos="<s>", eos="</s>", pad=None, add_bos=True, template=INST),
    "gemma": dict(bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True, template=GEMMA,
                  extra=["<start_of_turn>", "<end_of_turn>"]),
}


def tokenizer(family: str, vocab_size: int = 400):
    """A fresh byte-level BPE tokenizer with `family`'s special tokens and conventions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    s = _SPECIALS[family]
    specials = list(dict.fromkeys(t for t in (s["eos"], s["bos"], s["pad"], *s.get("extra", [])) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if s["add_bos"]:   # as Llama's tokenizer.json does: a post-processor prepends BOS
        bos = s["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    kw = {k + "_token": s[k] for k in ("bos", "eos", "pad") if s[k]}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                  padding_side="left" if family == "qwen2" else "right", **kw)
    if s["template"]:
        out.chat_template = s["template"]
    return out


def _config(family: str, tok, *, hidden: int = 32, layers: int = 2):
    import transformers as tf

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    v = len(tok)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=4 * hidden, max_position_embeddings=512, tie_word_embeddings=False,
                                **ids)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=2 * hidden, max_position_embeddings=512,
                              tie_word_embeddings=False, **ids)
    if family == "qwen2":
        return tf.Qwen2Config(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                              tie_word_embeddings=True, **ids)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=v, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **ids)
    if family == "mistral":
        return tf.MistralConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                                sliding_window=None, tie_word_embeddings=False, **ids)
    if family == "gemma":
        return tf.GemmaConfig(vocab_size=v, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=hidden // 4, intermediate_size=2 * hidden,
                              max_position_embeddings=512, tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


@functools.lru_cache(maxsize=None)
def _saved(family: str, root: str, seed: int) -> str:
    from transformers import AutoModelForCausalLM

    tok = tokenizer(family)
    cfg = _config(family, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    path = Path(root) / f"{family}-{seed}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def checkpoint(family: str, root: Path, *, seed: int = 0) -> Path:
    """A saved tiny random-init `family` checkpoint under `root` (built once per root, family and seed)."""
    return Path(_saved(family, str(root), seed))
