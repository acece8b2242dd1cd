"""The one internal conversation type every reader produces and every template renders."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("user", "assistant")


@dataclass
class Message:
    """One turn of a conversation.

    Attributes:
        role: ``"user"`` or ``"assistant"``.
        content: The message text, always tokenized as plain text (control tokens typed in it stay text).
        weight: Loss weight of this message's tokens (assistant turns only; the data pipeline resolves it
            from the record or the source's reward). ``None`` means "not yet resolved".
    """

    role: str
    content: str
    weight: float | None = None


@dataclass
class Conversation:
    """A conversation with its class condition and optional system text.

    Attributes:
        messages: The turns, user and assistant alternating as the source gives them.
        system: System text rendered before the first turn ("" for none).
        condition: Source-class condition placed into the role prefixes (e.g. ``"GPT4 Correct"``); "" for none.
    """

    messages: list[Message] = field(default_factory=list)
    system: str = ""
    condition: str = ""


def validate_conversation(conversation: Conversation) -> None:
    """Check roles and field types of a conversation (the renderer calls it).

    Args:
        conversation: the conversation to check.

    Raises:
        ValueError: on an unknown role or a non-string content / system / condition.
    """
    if not isinstance(conversation.system, str):
        raise ValueError(f"system must be a string, got {type(conversation.system).__name__}")
    if not isinstance(conversation.condition, str):
        raise ValueError(f"condition must be a string, got {type(conversation.condition).__name__}")
    for index, message in enumerate(conversation.messages):
        if message.role not in ROLES:
            raise ValueError(f"message {index}: role must be one of {ROLES}, got {message.role!r}")
        if not isinstance(message.content, str):
            raise ValueError(f"message {index}: content must be a string, got {type(message.content).__name__}")
