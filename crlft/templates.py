"""Conversation templates: the exact strings around each turn, the dict of templates, their jinja chat templates.

The exported jinja ``chat_template`` renders one string that agrees token for token with :mod:`crlft.render`'s
piecewise tokenization (why it can, in ``docs/design.md``, "Templates and tokenization").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The Mistral-7B-v0.1 SentencePiece model shipped inside the `mistral-common` package (offline base tokenizer).
MISTRAL_V1_SENTENCEPIECE = "mistral_v1_sentencepiece"


@dataclass(frozen=True)
class Template:
    """A conversation template: the exact strings around each turn and what the tokenizer needs.

    A role prefix is `role_open + label + role_close`, where label is the role's label, preceded by the condition
    (`f"{condition} {label}".strip()`) when `uses_condition` is set (OpenChat's C-RLFT prefixes: "GPT4 Correct User:",
    an empty condition gives "User:").

    Attributes:
        name: key in `TEMPLATES`.
        role_open: text before the role label (e.g. "<|im_start|>").
        user_label: label of user turns.
        assistant_label: label of assistant turns.
        role_close: text after the role label (e.g. ":" or "\\n").
        system_label: label of the system block's prefix; None writes the system text bare (no prefix).
        content_sep: text between the role prefix and non-empty message text (OpenChat: " ").
        eot: end-of-turn token, written after every turn's text; weighted like the turn (the model learns to stop).
        turn_sep: text after the end-of-turn token (weight 0), e.g. ChatML's "\\n".
        add_bos: start with the tokenizer's bos token (if it has one).
        uses_condition: whether the C-RLFT condition goes into the role prefixes.
        inference_condition: condition used at inference (generation prompt) when the conversation has none.
        special_tokens: tokens the template needs as control tokens, added to a tokenizer that lacks them, in order.
        pad_token: the padding token (one of the tokenizer's tokens or of `special_tokens`).
        offline_base: which base tokenizer `build_tokenizer` can build offline for it; None if none.
    """

    name: str
    role_open: str
    user_label: str
    assistant_label: str
    role_close: str
    system_label: str | None
    content_sep: str
    eot: str
    turn_sep: str
    add_bos: bool
    uses_condition: bool
    inference_condition: str
    special_tokens: tuple[str, ...]
    pad_token: str
    offline_base: str | None

    def role_prefix(self, role: str, condition: str = "") -> str:
        """The prefix text of a turn.

        Args:
            role: "user", "assistant" or "system".
            condition: C-RLFT condition; ignored by templates without conditions and by the system block.

        Returns:
            The prefix string, e.g. "GPT4 Correct User:".
        """
        if role == "system":
            assert self.system_label is not None, "templates without a system label write the system text bare"
            return self.role_open + self.system_label + self.role_close
        label = self.user_label if role == "user" else self.assistant_label
        if self.uses_condition:
            label = f"{condition} {label}".strip()
        return self.role_open + label + self.role_close

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokens the template writes as control tokens (never produced from message text)."""
        return tuple(dict.fromkeys((*self.special_tokens, self.eot)))

    @property
    def chat_template(self) -> str:
        """The HF jinja chat template that renders the same tokens as `render` (see ``docs/design.md``)."""
        return _jinja_chat_template(self)


def _jinja_str(text: str) -> str:
    """A jinja string literal for `text`."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


def _jinja_chat_template(template: Template) -> str:
    """Build the jinja chat template of a template from the same fields `render` uses.

    The template takes `messages` (optional system message first, then user / assistant), `add_generation_prompt`,
    and, for templates with conditions, an optional `condition` (default: the inference condition; "" gives the
    plain prefixes). Empty message text is written without `content_sep`, as `render` does.
    """
    q = _jinja_str
    parts = []
    if template.uses_condition:
        parts.append(
            "{%- if condition is not defined or condition is none %}"
            f"{{%- set condition = {q(template.inference_condition)} %}}{{%- endif %}}"
        )
    if template.add_bos:
        parts.append("{%- if bos_token is defined and bos_token %}{{- bos_token }}{%- endif %}")
    if template.system_label is None:
        system_block = "{{- message['content'] + " + q(template.eot + template.turn_sep) + " }}"
    else:
        system_block = (
            "{{- " + q(template.role_prefix("system")) + " + message['content'] + "
            + q(template.eot + template.turn_sep) + " }}"
        )
    if template.uses_condition:
        label = "((condition ~ ' ' ~ label) | trim)"
    else:
        label = "label"
    prefix = q(template.role_open) + " + " + label + " + " + q(template.role_close)
    parts.append(
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{%- if not loop.first %}{{- raise_exception('A system message must come first.') }}{%- endif %}"
        "{%- if message['content'] %}" + system_block + "{%- endif %}"
        "{%- elif message['role'] == 'user' or message['role'] == 'assistant' %}"
        f"{{%- set label = {q(template.user_label)} if message['role'] == 'user' else {q(template.assistant_label)} %}}"
        "{{- " + prefix + " }}"
        "{%- if message['content'] %}{{- " + q(template.content_sep) + " + message['content'] }}{%- endif %}"
        "{{- " + q(template.eot + template.turn_sep) + " }}"
        "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported.') }}"
        "{%- endif %}"
        "{%- endfor %}"
    )
    parts.append(
        "{%- if add_generation_prompt %}"
        f"{{%- set label = {q(template.assistant_label)} %}}"
        "{{- " + prefix + " }}"
        "{%- endif %}"
    )
    return "".join(parts)


TEMPLATES: dict[str, Template] = {
    # OpenChat 3.5 (Mistral): "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"; system text bare.
    "openchat_3.5": Template(
        name="openchat_3.5",
        role_open="",
        user_label="User",
        assistant_label="Assistant",
        role_close=":",
        system_label=None,
        content_sep=" ",
        eot="<|end_of_turn|>",
        turn_sep="",
        add_bos=True,
        uses_condition=True,
        inference_condition="GPT4 Correct",
        special_tokens=("<|end_of_turn|>", "<|pad_0|>"),
        pad_token="<|pad_0|>",
        offline_base=MISTRAL_V1_SENTENCEPIECE,
    ),
    # OpenChat 3.6 (Llama 3): "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nHello<|eot_id|>".
    "openchat_3.6": Template(
        name="openchat_3.6",
        role_open="<|start_header_id|>",
        user_label="User",
        assistant_label="Assistant",
        role_close="<|end_header_id|>\n\n",
        system_label="System",
        content_sep="",
        eot="<|eot_id|>",
        turn_sep="",
        add_bos=True,
        uses_condition=True,
        inference_condition="GPT4 Correct",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad_0|>"),
        pad_token="<|pad_0|>",
        offline_base=None,
    ),
    "chatml": Template(
        name="chatml",
        role_open="<|im_start|>",
        user_label="user",
        assistant_label="assistant",
        role_close="\n",
        system_label="system",
        content_sep="",
        eot="<|im_end|>",
        turn_sep="\n",
        add_bos=True,
        uses_condition=False,
        inference_condition="",
        special_tokens=("<|im_start|>", "<|im_end|>", "<|pad_0|>"),
        pad_token="<|pad_0|>",
        offline_base=MISTRAL_V1_SENTENCEPIECE,
    ),
    "llama3_instruct": Template(
        name="llama3_instruct",
        role_open="<|start_header_id|>",
        user_label="user",
        assistant_label="assistant",
        role_close="<|end_header_id|>\n\n",
        system_label="system",
        content_sep="",
        eot="<|eot_id|>",
        turn_sep="",
        add_bos=True,
        uses_condition=False,
        inference_condition="",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad_0|>"),
        pad_token="<|pad_0|>",
        offline_base=None,
    ),
    # Zephyr (Mistral): "<|user|>\nHello</s>\n<|assistant|>\n"; the role tags are plain text, `</s>` ends turns.
    "zephyr": Template(
        name="zephyr",
        role_open="<|",
        user_label="user",
        assistant_label="assistant",
        role_close="|>\n",
        system_label="system",
        content_sep="",
        eot="</s>",
        turn_sep="\n",
        add_bos=True,
        uses_condition=False,
        inference_condition="",
        special_tokens=("<|pad_0|>",),
        pad_token="<|pad_0|>",
        offline_base=MISTRAL_V1_SENTENCEPIECE,
    ),
}


def get_template(template: str | Template) -> Template:
    """Look a template up by name (a `Template` passes through).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[template]
