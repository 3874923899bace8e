"""The tokenization contract: how a (prompt, response) pair becomes token ids, the model's own way.

Every consumer (scoring, both trainers, generation, influence, the Trainer callback) encodes through this module, and
it does what TRL 1.x's SFTTrainer and DPOTrainer do (docs/glossary.md#tokenization):

- **Plain text** (`chat_template: none`, or a tokenizer without a template): the prompt is `tokenizer(prompt)` with the
  tokenizer's own special tokens (its BOS, when it adds one: Llama, Mistral, Gemma; none for GPT-2, Pythia, Qwen).
- **Chat template** (`auto` and the tokenizer has one): the prompt transcript is read back into messages
  (ldpipe.data.transcript) and rendered with `apply_chat_template(..., add_generation_prompt=True)`; the response is
  the assistant turn of the rendered conversation, ending in whatever the template closes a turn with.
- **The boundary** is where the tokenized prompt and the tokenized prompt + response diverge (TRL's
  `common_prefix_length`), so a merge across the boundary does not shift the response's tokens.
- **One cut per prompt**: all responses of a prompt start after the same prompt tokens, the earliest divergence
  among them (TRL's rule for a chosen/rejected pair, applied to the whole group).
- **EOS**: a plain-text response ends in the tokenizer's EOS (TRL appends it as text; the id is the same); a
  templated one in the template's end-of-turn token (end_of_turn_id), which generation also stops at.

Truncation is ldpipe's (docs/glossary.md): the prompt keeps its last `max_prompt_tokens` tokens, and a leading BOS
stays; the response keeps its first `max_response_tokens - 1` tokens and then gets its end token.
"""
from __future__ import annotations

import logging
from typing import Literal, Sequence

from ldpipe.data.transcript import text_to_reply, transcript_to_messages
from ldpipe.errors import LdpipeError

log = logging.getLogger(__name__)

# The contract's version, part of the config hash of runs of outside models; 2: the tokenizer's BOS, chat templates,
# TRL's boundary (1: no special tokens, prompt and response tokenized apart). The builtin model is the same under both.
ENCODING_VERSION = 2

ChatTemplate = Literal["auto", "none"]
CHAT_TEMPLATE_SETTINGS = ("auto", "none")


def uses_chat_template(tokenizer, setting: ChatTemplate | bool = "auto") -> bool:
    """Whether prompts are rendered by the tokenizer's chat template: `auto` = when the tokenizer has one."""
    if isinstance(setting, bool):
        return setting
    if setting not in CHAT_TEMPLATE_SETTINGS:
        raise LdpipeError(f"chat_template must be one of {list(CHAT_TEMPLATE_SETTINGS)}, got {setting!r}")
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def describe_format(tokenizer, setting: ChatTemplate = "auto") -> str:
    """One line for `ldpipe check` and logs: the format an experiment scores in."""
    chat = uses_chat_template(tokenizer, setting)
    first = prompt_ids(tokenizer, "\n\nHuman: Hi\n\nAssistant:", chat=chat)[:1]
    bos = tokenizer.bos_token_id
    bos_s = f"BOS {tokenizer.convert_ids_to_tokens(bos)!r} first" if bos is not None and first == [bos] else "no BOS"
    if chat:
        end = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer, chat=True))
        return (f"the model's chat template (prompts as messages, the response as the assistant turn ending in "
                f"{end!r}; {bos_s})")
    why = "chat_template: none" if setting == "none" else "the tokenizer has no chat template"
    return f"plain text as written ({why}; {bos_s}, EOS after the response)"


def eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LdpipeError("the tokenizer has no eos token; responses must end in EOS")
    return int(eos)


def end_of_turn_id(tokenizer, *, chat: bool) -> int:
    """The token a response ends in: EOS for plain text; in a chat template, the first special token after the
    assistant's text (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), else EOS. Generation stops
    at it, and a truncated response gets it."""
    eos = eos_id(tokenizer)
    if not chat:
        return eos
    msgs = [{"role": "user", "content": "Hi"}]
    head = _render(tokenizer, msgs, generation_prompt=True)
    full = _render(tokenizer, msgs + [{"role": "assistant", "content": "Yes"}], generation_prompt=False)
    n = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((t for t in full[n:] if t in special), eos)


def stop_ids(tokenizer, model=None, *, chat: bool) -> list[int]:
    """Every id generation stops at: the response's end token, EOS, and the model's generation_config EOS ids."""
    ids = [end_of_turn_id(tokenizer, chat=chat), eos_id(tokenizer)]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen if isinstance(gen, list) else [gen] if gen is not None else []
    return list(dict.fromkeys(int(i) for i in ids))


def _messages(prompt: str) -> list[dict]:
    return transcript_to_messages(prompt)


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    # tokenize=True renders without adding special tokens on top, as TRL's _tokenize does: a template that writes
    # its own BOS (Llama 3, Mistral, Gemma) is not given a second one
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 (jinja2's TemplateError, raised by the template's own checks)
        roles = [m.get("role") for m in messages]
        raise LdpipeError(f"the model's chat template refused messages with roles {roles}: {type(e).__name__}: {e}. "
                          "Some templates allow no system turn or need user/assistant to alternate; set "
                          "probes.chat_template: none to score the text as written") from None
    return list(out["input_ids"])


def prompt_ids(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """The prompt as the model sees it before its response (also what generation continues)."""
    if chat:
        return _render(tokenizer, _messages(prompt), generation_prompt=True)
    return list(tokenizer(prompt)["input_ids"])


def full_ids(tokenizer, prompt: str, responses: Sequence[str], *, chat: bool) -> list[list[int]]:
    """prompt + response token ids for each response, EOS-terminated as TRL does for plain text."""
    if chat:
        msgs = _messages(prompt)
        return [_render(tokenizer, msgs + [{"role": "assistant", "content": text_to_reply(r)}], generation_prompt=False)
                for r in responses]
    eos = eos_id(tokenizer)
    out = tokenizer([prompt + r for r in responses])["input_ids"] if responses else []
    return [list(ids) if ids and ids[-1] == eos else list(ids) + [eos] for ids in out]


_warned_boundary = False


def shared_cut(p_ids: list[int], fulls: Sequence[list[int]], tokenizer=None) -> int:
    """Where a prompt's responses start: the earliest point at which any prompt + response leaves the tokenized
    prompt (TRL's rule: DPOTrainer cuts chosen and rejected at the shorter of their two common prefixes), so all the
    responses of one prompt are scored after the same prompt tokens."""
    global _warned_boundary
    from trl.data_utils import common_prefix_length   # lazily: importing TRL takes seconds

    n = min((common_prefix_length(p_ids, f) for f in fulls), default=len(p_ids))
    if n < len(p_ids) and not _warned_boundary:
        _warned_boundary = True
        tail = tokenizer.decode(p_ids[n:]) if tokenizer is not None else p_ids[n:]
        log.warning("the tokenized prompt is not a prefix of the tokenized prompt + response (a chat template that "
                    "renders the prompt differently, or a merge across the boundary); as TRL does, the response "
                    "starts where they diverge, and the prompt's end %r is left out. Shown once.", tail)
    return n


def truncate(prompt: list[int], response: list[int], *, eos: int, bos: int | None, max_prompt_tokens: int,
             max_response_tokens: int) -> tuple[list[int], list[int]]:
    """ldpipe's truncation: the prompt's last tokens (a leading `bos`, from the tokenizer or the template, kept),
    the response's first then `eos` (the response's end token)."""
    if len(prompt) > max_prompt_tokens:
        keep_bos = bos is not None and prompt[0] == bos and max_prompt_tokens > 1
        prompt = ([bos] + prompt[-(max_prompt_tokens - 1):]) if keep_bos else prompt[-max_prompt_tokens:]
    if len(response) > max_response_tokens:
        response = response[: max_response_tokens - 1] + [eos]
    return prompt, response


def check_limits(max_prompt_tokens: int, max_response_tokens: int) -> None:
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise LdpipeError(f"need max_prompt_tokens >= 1 and max_response_tokens >= 1, "
                          f"got {max_prompt_tokens} and {max_response_tokens}")


def encode_responses(tokenizer, prompt: str, responses: Sequence[str], *, chat: bool, max_prompt_tokens: int,
                     max_response_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) for each response of one prompt, by the contract in the module docstring; every
    response is cut after the same prompt tokens (shared_cut), so the prompt ids are one list for all of them."""
    check_limits(max_prompt_tokens, max_response_tokens)
    p = prompt_ids(tokenizer, prompt, chat=chat)
    if not p:
        raise LdpipeError(f"prompt {prompt[:40]!r} is empty after tokenization; "
                          "the first response token needs a prompt to be predicted from")
    fulls = full_ids(tokenizer, prompt, responses, chat=chat)
    n = shared_cut(p, fulls, tokenizer)
    if n == 0:
        raise LdpipeError(f"prompt {prompt[:40]!r} shares no token with prompt + response after tokenization")
    end = end_of_turn_id(tokenizer, chat=chat)
    kept = truncate(p[:n], [], eos=end, bos=tokenizer.bos_token_id, max_prompt_tokens=max_prompt_tokens,
                    max_response_tokens=1)[0]
    return [(kept, truncate([], f[n:], eos=end, bos=None, max_prompt_tokens=max_prompt_tokens,
                            max_response_tokens=max_response_tokens)[1]) for f in fulls]


def encode_prompt(tokenizer, prompt: str, *, chat: bool, max_prompt_tokens: int) -> list[int]:
    """The prompt ids generation continues from, truncated as the scorer truncates them."""
    p = prompt_ids(tokenizer, prompt, chat=chat)
    return truncate(p, [], eos=0, bos=tokenizer.bos_token_id, max_prompt_tokens=max_prompt_tokens,
                    max_response_tokens=1)[0]
