"""Prompts between the reference's transcript form and chat messages (ldpipe.data.transcript)."""
import pytest

from ldpipe.data.transcript import (TranscriptError, messages_to_transcript, reply_to_text, text_to_reply,
                                    transcript_to_messages)


def test_messages_round_trip_through_a_transcript():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": " two spaces"}, {"role": "user", "content": "And?"}]
    text = messages_to_transcript(msgs)
    assert text == "\n\nSystem: Be brief.\n\nHuman: Hi\nthere\n\nAssistant:  two spaces\n\nHuman: And?\n\nAssistant:"
    assert transcript_to_messages(text) == msgs
    assert text_to_reply(reply_to_text(" x")) == " x" and text_to_reply(" The end.") == "The end."


def test_reference_forms_and_plain_text_read_as_messages():
    hh = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert transcript_to_messages(hh) == [{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": "4."},
                                          {"role": "user", "content": "And 3+3?"}]
    # UltraFeedback's reference form: no leading blank line, a single newline before the generation marker
    assert transcript_to_messages("Human: Name a colour.\nAssistant:") == [{"role": "user", "content": "Name a colour."}]
    assert transcript_to_messages("What gas do plants take in?") == [{"role": "user",
                                                                      "content": "What gas do plants take in?"}]


def test_a_message_that_could_not_be_read_back_is_refused():
    with pytest.raises(TranscriptError, match="turn marker"):
        messages_to_transcript([{"role": "user", "content": "quote:\n\nAssistant: hi"}])
    with pytest.raises(TranscriptError, match="role 'tool'"):
        messages_to_transcript([{"role": "tool", "content": "x"}])
