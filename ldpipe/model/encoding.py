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
- **EOS**: a plain-text response ends in the tokenizer's EOS (TRL appends it as text; the id is the same).

Truncation is ldpipe's (docs/glossary.md): the prompt keeps its last `max_prompt_tokens` tokens, and a leading BOS
stays; the response keeps its first `max_response_tokens - 1` tokens and then gets EOS.
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
    bos = _added_bos(tokenizer)
    bos_s = f"BOS {tokenizer.convert_ids_to_tokens(bos)!r} first" if bos is not None else "no BOS"
    if uses_chat_template(tokenizer, setting):
        return f"the model's chat template (prompts as messages, the response as the assistant turn; {bos_s})"
    why = "chat_template: none" if setting == "none" else "the tokenizer has no chat template"
    return f"plain text as written ({why}; {bos_s}, EOS after the response)"


def eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LdpipeError("the tokenizer has no eos token; responses must end in EOS")
    return int(eos)


def _added_bos(tokenizer) -> int | None:
    """The BOS id that `tokenizer(text)` puts first, or None when it adds none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return int(bos) if probe and probe[0] == bos else None


def _messages(prompt: str) -> list[dict]:
    return transcript_to_messages(prompt)


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    # tokenize=True renders without adding special tokens on top, as TRL's _tokenize does: a template that writes
    # its own BOS (Llama 3, Mistral, Gemma) is not given a second one
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
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


def split_at_boundary(p_ids: list[int], full: list[int], tokenizer=None) -> tuple[list[int], list[int]]:
    """(prompt part, response part) of `full`, cut where it stops starting with `p_ids` (TRL's rule)."""
    global _warned_boundary
    from trl.data_utils import common_prefix_length   # lazily: importing TRL takes seconds

    n = common_prefix_length(p_ids, full)
    if n < len(p_ids) and not _warned_boundary:
        _warned_boundary = True
        tail = tokenizer.decode(p_ids[n:]) if tokenizer is not None else p_ids[n:]
        log.warning("the tokenized prompt is not a prefix of the tokenized prompt + response (a chat template that "
                    "renders the prompt differently, or a merge across the boundary); as TRL does, the response "
                    "starts where they diverge, and the prompt's end %r is left out. Shown once.", tail)
    return full[:n], full[n:]


def truncate(prompt: list[int], response: list[int], *, eos: int, bos: int | None, max_prompt_tokens: int,
             max_response_tokens: int) -> tuple[list[int], list[int]]:
    """ldpipe's truncation: the prompt's last tokens (a leading BOS kept), the response's first then EOS."""
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
    """(prompt_ids, response_ids) for each response of one prompt, by the contract in the module docstring."""
    check_limits(max_prompt_tokens, max_response_tokens)
    p = prompt_ids(tokenizer, prompt, chat=chat)
    if not p:
        raise LdpipeError(f"prompt {prompt[:40]!r} is empty after tokenization; "
                          "the first response token needs a prompt to be predicted from")
    eos, bos = eos_id(tokenizer), _added_bos(tokenizer)
    out = []
    for full in full_ids(tokenizer, prompt, responses, chat=chat):
        pp, rr = split_at_boundary(p, full, tokenizer)
        if not pp:
            raise LdpipeError(f"prompt {prompt[:40]!r} shares no token with prompt + response after tokenization")
        out.append(truncate(pp, rr, eos=eos, bos=bos, max_prompt_tokens=max_prompt_tokens,
                            max_response_tokens=max_response_tokens))
    return out


def encode_prompt(tokenizer, prompt: str, *, chat: bool, max_prompt_tokens: int) -> list[int]:
    """The prompt ids generation continues from, truncated as the scorer truncates them."""
    p = prompt_ids(tokenizer, prompt, chat=chat)
    return truncate(p, [], eos=0, bos=_added_bos(tokenizer), max_prompt_tokens=max_prompt_tokens,
                    max_response_tokens=1)[0]
