"""Prompts as transcripts and as chat messages, and the way between them.

ldpipe stores every prompt as text in the reference's transcript form ("\\n\\nHuman: ...\\n\\nAssistant:"), so that
one probe table serves both scoring formats (docs/glossary.md#tokenization):
- `chat_template: none` scores the text as written (the paper's format, and the builtin model's);
- a model with a chat template gets the transcript back as messages, rendered by its own template.

Conversational data (TRL's lists of {role, content}) is written into this form when it is loaded, with a system
turn as "\\n\\nSystem: ...". Replies follow "Assistant:" after one space, which the message form drops. The way back is
exact unless a message itself contains a turn marker, which the writer refuses (it could not be read back).
"""
from __future__ import annotations

import re

ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_SPEAKERS = {v: k for k, v in ROLES.items()}
# A turn starts at the beginning of the text or after a blank line. UltraFeedback's reference form
# ("Human: ...\nAssistant:") ends in a single-newline generation marker, read by _UF_END.
_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant|System):")
_INNER = re.compile(r"\n\n(Human|Assistant|System):")
_UF_END = re.compile(r"(?<!\n)\nAssistant:\s*\Z")


class TranscriptError(ValueError):
    """A message list that has no faithful transcript (a marker inside a message, an unknown role)."""


def messages_to_transcript(messages: list[dict], *, generation_prompt: bool = True) -> str:
    """"\\n\\nHuman: a\\n\\nAssistant: b..." for `messages`, ending in "\\n\\nAssistant:" when `generation_prompt`."""
    parts = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise TranscriptError(f"message {i} has role {role!r}; ldpipe reads {sorted(ROLES)}")
        if not isinstance(content, str):
            raise TranscriptError(f"message {i} has non-text content ({type(content).__name__})")
        if _INNER.search(content):
            raise TranscriptError(f"message {i} contains a turn marker ('Human:', 'Assistant:' or 'System:' after a "
                                  "blank line), so its transcript could not be read back")
        parts.append(f"\n\n{ROLES[role]}: {content}")
    if generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts)


def transcript_to_messages(text: str) -> list[dict]:
    """The messages of a transcript prompt; its final empty "Assistant:" is the generation prompt and is dropped.

    Text without any turn marker is one user message (a plain-text prompt)."""
    body = _UF_END.sub("\n\nAssistant:", text)
    marks = list(_TURN.finditer(body))
    if not marks:
        return [{"role": "user", "content": text.strip()}]
    messages = []
    lead = body[: marks[0].start()].strip()
    if lead:  # text before the first marker belongs to the user
        messages.append({"role": "user", "content": lead})
    for m, nxt in zip(marks, [*marks[1:], None]):
        content = body[m.end(): nxt.start() if nxt else len(body)]
        messages.append({"role": _SPEAKERS[m.group(1)], "content": content[1:] if content.startswith(" ") else content})
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages


def reply_to_text(content: str) -> str:
    """A reply as it follows "Assistant:" in a transcript (one space before it)."""
    return " " + content


def text_to_reply(text: str) -> str:
    """The assistant message of a transcript reply: the one separating space dropped."""
    return text[1:] if text.startswith(" ") else text
