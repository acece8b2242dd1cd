"""Conversation templates: render a conversation into token ids + loss weights, and the matching HF chat template.

A conversation becomes (OpenChat's `ConversationTemplate` semantics, the training format):

    [bos] [system block] (role prefix, text, end-of-turn, turn separator) per message [generation prefix]

Each piece is tokenized on its own and the ids are concatenated, so the boundary between a role prefix and the
message text never depends on the text. Message and system text is always tokenized as text: control tokens typed
inside it (`<s>`, `<|end_of_turn|>`, ...) come out as ordinary pieces, never as control ids.

The exported jinja `chat_template` renders one string that the tokenizer encodes in one go at inference. The two agree
because every cut between pieces is a place where whole-string tokenization cannot merge across either (after a
control token, at the space that starts a SentencePiece word, after a newline, which is a byte piece that never
merges), and because text that continues plain text (the message after `<|im_start|>user\\n`) is tokenized without
the SentencePiece dummy prefix, as inside the whole string. The round-trip tests check this for every template.

SentencePiece tokenizers (Llama / Mistral) are used in their exact "legacy" form: the dummy prefix `▁` goes before
every text segment, also right after a control token. That is what OpenChat 3.5 was trained with ("▁G" 420 after
`<|end_of_turn|>` in the model card), and `load_tokenizer` / `build_tokenizer` make sure of it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from crlft.conversation import Conversation, Message, validate_conversation

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
        """The HF jinja chat template that renders the same tokens as `render` (see module docstring)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer plumbing


def _backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _without_dummy_prefix(backend_json: dict) -> dict:
    """A copy of a backend tokenizer's JSON that does not prepend the SentencePiece dummy prefix `▁`.

    Used for text that continues plain text (inside the whole string the tokenizer would not prepend there).
    """
    result = json.loads(json.dumps(backend_json))  # a deep copy, faster than copy.deepcopy

    def strip_prepend(node):
        if node is None:
            return None
        if node.get("type") == "Sequence":
            key = "normalizers" if "normalizers" in node else "pretokenizers"
            items = [strip_prepend(child) for child in node[key]]
            node[key] = [child for child in items if child is not None]
            return node
        if node.get("type") == "Prepend":
            return None
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
        if node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
        return node

    result["normalizer"] = strip_prepend(result.get("normalizer"))
    result["pre_tokenizer"] = strip_prepend(result.get("pre_tokenizer"))
    return result


class _Encoder:
    """Fast batch encoding of text pieces for one tokenizer: plain text (control tokens escaped) and template text."""

    def __init__(self, tokenizer, template: Template):
        from tokenizers import Tokenizer

        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"crlft needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
        self.template = template
        backend_json = _backend_json(tokenizer)
        backend_json["truncation"] = None
        backend_json["padding"] = None
        # Segment start: text after a control token or at the start (gets the dummy prefix, like the whole string).
        self.start = Tokenizer.from_str(json.dumps(backend_json))
        self.start.encode_special_tokens = True
        # Continuation: text right after plain text.
        self.continuation = Tokenizer.from_str(json.dumps(_without_dummy_prefix(backend_json)))
        self.continuation.encode_special_tokens = True
        vocab = tokenizer.get_vocab()
        missing = [token for token in template.control_tokens if token not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks the control tokens {missing} of template {template.name!r}; "
                "load it with crlft.templates.load_tokenizer"
            )
        self.control_ids = {token: vocab[token] for token in template.control_tokens}
        self.bos_ids = [tokenizer.bos_token_id] if template.add_bos and tokenizer.bos_token_id is not None else []
        self.named_tokens = tuple(str(token) for token in tokenizer.all_special_tokens)
        self._fixed_cache: dict[tuple[str, bool], tuple[list[int], bool]] = {}

    def encode_text(self, texts: list[str], continuation: bool) -> list[list[int]]:
        """Encode text as text: control tokens typed inside stay ordinary pieces."""
        if not texts:
            return []
        backend = self.continuation if continuation else self.start
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_fixed(self, text: str, continuation: bool) -> tuple[list[int], bool]:
        """Encode template text (role prefixes, end-of-turn + separator): its control tokens become control ids.

        Args:
            text: the template text.
            continuation: whether the text follows plain text (rather than a control token or the start).

        Returns:
            (ids, whether text after this one continues plain text).
        """
        key = (text, continuation)
        cached = self._fixed_cache.get(key)
        if cached is not None:
            return cached
        ids: list[int] = []
        rest = text
        while rest:
            # earliest control token in the rest (longest first on ties)
            position, token = min(
                ((rest.find(token), token) for token in self.control_ids if token in rest),
                key=lambda item: (item[0], -len(item[1])),
                default=(-1, ""),
            )
            plain = rest if position < 0 else rest[:position]
            if plain:
                ids.extend(self.encode_text([plain], continuation)[0])
                continuation = True
            if position < 0:
                break
            ids.append(self.control_ids[token])
            continuation = False
            rest = rest[position + len(token):]
        self._fixed_cache[key] = (ids, continuation)
        return ids, continuation


_ENCODER_CACHE: dict[tuple[int, str, int], tuple[object, _Encoder]] = {}


def _encoder_for(tokenizer, template: Template) -> _Encoder:
    """The cached encoder of (tokenizer, template); rebuilt when tokens were added to the tokenizer since."""
    key = (id(tokenizer), template.name, len(tokenizer))
    cached = _ENCODER_CACHE.get(key)
    # the cache holds the tokenizer, so its id cannot be reused by another object while cached
    if cached is not None and cached[0] is tokenizer and cached[1].template == template:
        return cached[1]
    encoder = _Encoder(tokenizer, template)
    if len(_ENCODER_CACHE) > 16:
        _ENCODER_CACHE.clear()
    _ENCODER_CACHE[key] = (tokenizer, encoder)
    return encoder


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def render(
    conversation: Conversation,
    template: str | Template,
    tokenizer,
    *,
    per_sequence_loss: bool = False,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[float]]:
    """Render one conversation into input ids and unshifted loss weights.

    `loss_weights[i]` weighs predicting `input_ids[i]`. Bos, system, role-prefix and turn-separator tokens weigh 0.
    A turn's text tokens and its end-of-turn token weigh the message's weight (user messages: their weight if set,
    as OpenChat does, else 0). With `per_sequence_loss` a message's weight is divided by its (text + end-of-turn)
    token count, as OpenChat's `seq_level_weight` does.

    Args:
        conversation: the conversation.
        template: a template name or `Template`.
        tokenizer: a fast tokenizer holding the template's control tokens (see `load_tokenizer`).
        per_sequence_loss: normalise each message's weight by its token count.
        add_generation_prompt: append the assistant prefix for generation; an empty condition then means the
            template's inference condition (OpenChat's inference mode). Weights may be None here (read as 0).

    Returns:
        (input_ids, loss_weights), of equal length.

    Raises:
        ValueError: unknown template or role, an assistant message without weight (training), missing control tokens.
    """
    ids, weights = render_batch(
        [conversation], template, tokenizer, per_sequence_loss=per_sequence_loss,
        add_generation_prompt=add_generation_prompt,
    )
    return ids[0], weights[0]


def render_batch(
    conversations: Sequence[Conversation],
    template: str | Template,
    tokenizer,
    *,
    per_sequence_loss: bool = False,
    add_generation_prompt: bool = False,
) -> tuple[list[list[int]], list[list[float]]]:
    """Render many conversations; the same result as `render` on each, but with one tokenizer call for all texts.

    Args:
        conversations: the conversations.
        template: a template name or `Template`.
        tokenizer: a fast tokenizer holding the template's control tokens (see `load_tokenizer`).
        per_sequence_loss: normalise each message's weight by its token count.
        add_generation_prompt: see `render`.

    Returns:
        (input_ids per conversation, loss_weights per conversation).

    Raises:
        ValueError: see `render`.
    """
    template = get_template(template)
    encoder = _encoder_for(tokenizer, template)
    encode_fixed = encoder.encode_fixed
    # end-of-turn + separator; what follows it continues plain text when the separator is non-empty
    eot_sep_ids, after_turn_is_plain = encode_fixed(template.eot + template.turn_sep, False)
    num_sep_tokens = len(eot_sep_ids) - 1
    assert eot_sep_ids[0] == encoder.control_ids[template.eot]

    # Pass 1: collect all texts (message and system), each with its tokenization mode, and validate.
    start_texts: list[str] = []
    continuation_texts: list[str] = []
    plans = []  # per conversation: list of (kind, payload)
    checked_conditions: set[str] = set()
    for conversation_index, conversation in enumerate(conversations):
        validate_conversation(conversation)
        condition = conversation.condition
        if add_generation_prompt and not condition:
            condition = template.inference_condition
        if condition and template.uses_condition and condition not in checked_conditions:
            # the condition is written into the role prefixes, where control tokens are live: refuse them
            typed = [token for token in (*encoder.control_ids, *encoder.named_tokens) if token in condition]
            if typed:
                raise ValueError(f"conversation {conversation_index}: condition {condition!r} contains control "
                                 f"tokens {typed}")
            checked_conditions.add(condition)
        plan = []
        previous_plain = False  # whether the text before the next piece ends with plain text
        if encoder.bos_ids:
            plan.append(("fixed0", encoder.bos_ids))
        if conversation.system:
            if template.system_label is not None:
                prefix_ids, previous_plain = encode_fixed(template.role_prefix("system"), previous_plain)
                plan.append(("fixed0", prefix_ids))
            text_continues = previous_plain
            texts = continuation_texts if text_continues else start_texts
            plan.append(("system", (text_continues, len(texts))))
            texts.append(conversation.system)
            plan.append(("fixed0", eot_sep_ids))
            previous_plain = after_turn_is_plain
        for message_index, message in enumerate(conversation.messages):
            prefix_ids, text_continues = encode_fixed(template.role_prefix(message.role, condition), previous_plain)
            plan.append(("fixed0", prefix_ids))
            weight = _message_weight(message, conversation_index, message_index, add_generation_prompt)
            if message.content:
                texts = continuation_texts if text_continues else start_texts
                plan.append(("message", (text_continues, len(texts), weight)))
                # content_sep only exists between plain prefix text and the message text
                texts.append(template.content_sep + message.content)
            else:
                plan.append(("message", (None, 0, weight)))
            previous_plain = after_turn_is_plain
        if add_generation_prompt:
            prefix_ids, _ = encode_fixed(template.role_prefix("assistant", condition), previous_plain)
            plan.append(("fixed0", prefix_ids))
        plans.append(plan)

    start_ids = encoder.encode_text(start_texts, continuation=False)
    continuation_ids = encoder.encode_text(continuation_texts, continuation=True)

    # Pass 2: assemble with list extends (no per-token Python work).
    all_ids: list[list[int]] = []
    all_weights: list[list[float]] = []
    for plan in plans:
        ids: list[int] = []
        weights: list[float] = []
        for kind, payload in plan:
            if kind == "fixed0":
                ids.extend(payload)
                weights.extend([0.0] * len(payload))
            elif kind == "system":
                text_continues, index = payload
                text_ids = (continuation_ids if text_continues else start_ids)[index]
                ids.extend(text_ids)
                weights.extend([0.0] * len(text_ids))
            else:
                text_continues, index, weight = payload
                text_ids = [] if text_continues is None else (continuation_ids if text_continues else start_ids)[index]
                if per_sequence_loss:
                    weight = weight / (len(text_ids) + 1)
                ids.extend(text_ids)
                weights.extend([weight] * (len(text_ids) + 1))
                ids.extend(eot_sep_ids)
                weights.extend([0.0] * num_sep_tokens)
        all_ids.append(ids)
        all_weights.append(weights)
    return all_ids, all_weights


def _message_weight(message: Message, conversation_index: int, message_index: int, inference: bool) -> float:
    if message.weight is not None:
        return float(message.weight)
    if message.role == "assistant" and not inference:
        raise ValueError(
            f"conversation {conversation_index}, message {message_index}: assistant message has no weight "
            "(the data pipeline must resolve it)"
        )
    return 0.0


def to_chat_messages(conversation: Conversation) -> list[dict[str, str]]:
    """The conversation as HF chat messages (system first when present), for `apply_chat_template`."""
    messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
    messages.extend({"role": message.role, "content": message.content} for message in conversation.messages)
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers

# SentencePiece (Llama / Mistral) semantics in `tokenizers` terms. The dummy prefix `▁` goes before every text segment
# (also after control tokens: the "legacy" behaviour OpenChat 3.5 was trained with), spaces become `▁`, and words are
# cut before each run of `▁` that follows other text; no SentencePiece piece spans such a cut, so the cut only makes
# BPE faster (its word cache) without changing the result.
_SP_PREPEND = {"type": "Prepend", "prepend": "▁"}
_SP_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
_SP_WORD_REGEX = "[^▁]+|▁+[^▁]*"


def _sentencepiece_normalizer():
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _sentencepiece_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(_SP_WORD_REGEX), behavior="isolated")


def _component_json(component) -> dict:
    """The JSON of a backend component (normalizer, pre-tokenizer), without serializing the whole vocabulary."""
    return {} if component is None else json.loads(component.__getstate__())


def _has_exact_sentencepiece_pipeline(backend) -> bool:
    normalizer = _component_json(backend.normalizer)
    pre_tokenizer = _component_json(backend.pre_tokenizer)
    return (
        normalizer.get("type") == "Sequence"
        and normalizer.get("normalizers") == [_SP_PREPEND, _SP_REPLACE]
        and pre_tokenizer.get("type") == "Split"
        and pre_tokenizer.get("pattern") == {"Regex": _SP_WORD_REGEX}
    )


def _is_sentencepiece_bpe(backend) -> bool:
    """A BPE with byte fallback whose spaces are `▁` (Llama / Mistral SentencePiece, converted)."""
    if type(backend.model).__name__ != "BPE" or not backend.model.byte_fallback:
        return False
    text = json.dumps([_component_json(backend.normalizer), _component_json(backend.pre_tokenizer)],
                      ensure_ascii=False)
    return "Metaspace" in text or "▁" in text


@functools.lru_cache(maxsize=4)
def _sentencepiece_backend_json(model_file: str, mtime_ns: int) -> str:
    return _build_sentencepiece_backend(model_file).to_str()


def sentencepiece_backend(model_file: str):
    """Build a `tokenizers.Tokenizer` that encodes exactly like the SentencePiece BPE model in `model_file`.

    transformers 5's own conversion of a `.model` does not order the BPE merges by SentencePiece score (`▁ ▁`,
    score -1e9, comes first) and uses a Metaspace pre-tokenizer that skips the dummy prefix when text already starts
    with a space, so runs of spaces tokenize differently from SentencePiece (and from OpenChat's slow tokenizer):
    "a  b" gives `▁a ▁▁ b` instead of `▁a ▁ ▁b`. Here merges are ordered by the merged piece's score, as
    SentencePiece's BPE applies them, and the dummy prefix is always added (legacy).

    Args:
        model_file: path of a SentencePiece BPE `.model` (e.g. Mistral-7B-v0.1's).

    Returns:
        The backend tokenizer with `<unk>`, `<s>`, `</s>` (or the model's control pieces) as special tokens.

    Raises:
        ValueError: the model is not a byte-fallback BPE SentencePiece model.
    """
    from tokenizers import Tokenizer

    # Building takes a second (merges from 32k pieces); reuse the result for the same file.
    return Tokenizer.from_str(_sentencepiece_backend_json(model_file, os.stat(model_file).st_mtime_ns))


def _build_sentencepiece_backend(model_file: str):
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    bpe_type = sentencepiece_model_pb2.TrainerSpec.BPE
    if proto.trainer_spec.model_type != bpe_type or not proto.trainer_spec.byte_fallback:
        raise ValueError(f"{model_file}: only byte-fallback BPE SentencePiece models are supported")
    if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.remove_extra_whitespaces:
        raise ValueError(f"{model_file}: SentencePiece normalizer {proto.normalizer_spec.name!r} is not supported")
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    candidates = []
    for index, piece in enumerate(proto.pieces):
        if piece.type != normal:
            continue
        for cut in range(1, len(piece.piece)):
            left, right = piece.piece[:cut], piece.piece[cut:]
            if left in vocab and right in vocab and proto.pieces[vocab[left]].type == normal \
                    and proto.pieces[vocab[right]].type == normal:
                candidates.append((-piece.score, index, cut, left, right))
    candidates.sort()
    merges = [(left, right) for _, _, _, left, right in candidates]
    unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_piece, fuse_unk=True, byte_fallback=True))
    control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    unknown = sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN
    backend.add_special_tokens([
        AddedToken(piece.piece, special=True, normalized=False)
        for piece in proto.pieces if piece.type in (control, unknown)
    ])
    backend.normalizer = _sentencepiece_normalizer()
    backend.pre_tokenizer = _sentencepiece_pre_tokenizer()
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return backend


def _fast_tokenizer_from_backend(backend, **special_tokens):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def _exact_sentencepiece(tokenizer):
    """Return a tokenizer whose backend encodes exactly like SentencePiece (legacy), keeping all token ids.

    A tokenizer already carrying the exact pipeline (e.g. one written by `build_tokenizer`) is returned as is.
    """
    if not _is_sentencepiece_bpe(tokenizer.backend_tokenizer) or \
            _has_exact_sentencepiece_pipeline(tokenizer.backend_tokenizer):
        return tokenizer
    from tokenizers import Tokenizer

    model_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(model_file, str) and model_file.endswith(".model") and os.path.isfile(model_file):
        backend = sentencepiece_backend(model_file)
        base_size = backend.get_vocab_size(with_added_tokens=False)
        extra = sorted(
            ((index, token) for index, token in tokenizer.added_tokens_decoder.items() if index >= base_size),
            key=lambda item: item[0],
        )
        for expected_index, (index, token) in enumerate(extra, start=base_size):
            if index != expected_index:
                raise ValueError(f"added token {token.content!r} has id {index}, expected {expected_index}")
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
        reason = f"rebuilt from {model_file}"
    else:
        # No SentencePiece model: keep vocab and merges (tokenizer.json files converted by transformers 4, as on the
        # hub, order them by score) and switch to the legacy SentencePiece pre-tokenization.
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.normalizer = _sentencepiece_normalizer()
        backend.pre_tokenizer = _sentencepiece_pre_tokenizer()
        reason = "pre-tokenization switched to legacy SentencePiece"
    backend.post_processor = tokenizer.backend_tokenizer.post_processor
    backend.no_truncation()
    backend.no_padding()
    logger.info("tokenizer %s: %s", getattr(tokenizer, "name_or_path", ""), reason)
    named = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    named_special_tokens = {key: str(value) for key, value in tokenizer.special_tokens_map.items() if key in named}
    result = _fast_tokenizer_from_backend(backend, **named_special_tokens)
    for index, token in tokenizer.added_tokens_decoder.items():
        if result.convert_tokens_to_ids(token.content) != index:
            raise ValueError(f"token {token.content!r} changed id while rebuilding the tokenizer")
    result.name_or_path = getattr(tokenizer, "name_or_path", "")
    if tokenizer.chat_template:
        result.chat_template = tokenizer.chat_template
    return result


def _prepare_tokenizer(tokenizer, template: Template):
    """Add the template's control tokens (appended in order), set pad, eos (= end-of-turn) and the chat template."""
    from tokenizers import AddedToken

    tokenizer = _exact_sentencepiece(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in dict.fromkeys((*template.special_tokens, template.eot, template.pad_token))
               if token not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing],
                             special_tokens=True)
    tokenizer.pad_token = template.pad_token
    # Generation stops at the end-of-turn token.
    tokenizer.eos_token = template.eot
    tokenizer.chat_template = template.chat_template
    if tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(template.eot):
        raise ValueError(f"template {template.name!r}: pad token must differ from the end-of-turn token")
    for token in template.control_tokens:
        if tokenizer.encode(token, add_special_tokens=False) != [tokenizer.convert_tokens_to_ids(token)]:
            raise ValueError(f"template {template.name!r}: {token!r} is not a single control token of the tokenizer")
    return tokenizer


def load_tokenizer(path_or_name: str, template: str | Template):
    """Load a tokenizer for training with a template; never loads model weights.

    Adds the template's special tokens the tokenizer lacks (appended in the template's order, so their ids are
    `len(tokenizer)`, `len(tokenizer) + 1`, ...: the trainer resizes the embeddings to `len(tokenizer)`), sets the
    pad token, sets eos to the end-of-turn token (generation stops there) and installs the template's chat template.
    SentencePiece BPE tokenizers (Llama / Mistral) are switched to exact legacy SentencePiece encoding (dummy prefix
    after control tokens too, SentencePiece's merge order), which is what OpenChat 3.5 was trained with.

    Args:
        path_or_name: tokenizer directory (or hub name, if the hub is reachable).
        template: template name or `Template`.

    Returns:
        A fast tokenizer (`PreTrainedTokenizerFast`).

    Raises:
        ValueError: unknown template, a slow-only tokenizer, control tokens that are not single tokens.
    """
    from transformers import AutoTokenizer

    template = get_template(template)
    tokenizer = AutoTokenizer.from_pretrained(path_or_name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{path_or_name}: crlft needs a fast tokenizer (tokenizer.json), got {type(tokenizer).__name__}"
        )
    return _prepare_tokenizer(tokenizer, template)


def mistral_v1_sentencepiece_file() -> str:
    """Path of Mistral-7B-v0.1's SentencePiece model inside the `mistral-common` package.

    Raises:
        ValueError: the package (or the file) is missing.
    """
    try:
        import mistral_common
    except ImportError as error:
        raise ValueError("the offline Mistral tokenizer needs the `mistral-common` package") from error
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise ValueError(f"mistral-common has no {path}; install a version that ships tokenizer.model.v1")
    return path


def make_tokenizer(template_name: str):
    """Build a template's tokenizer in memory, offline (see `build_tokenizer`).

    Args:
        template_name: a template whose base tokenizer is available offline.

    Returns:
        The fast tokenizer (not saved).

    Raises:
        ValueError: unknown template, or one whose base tokenizer is not available offline.
    """
    template = get_template(template_name)
    if template.offline_base != MISTRAL_V1_SENTENCEPIECE:
        offline = sorted(name for name, item in TEMPLATES.items() if item.offline_base)
        raise ValueError(
            f"template {template.name!r}: its base tokenizer is not available offline; crlft can build "
            f"{', '.join(offline)} (Mistral-7B-v0.1 SentencePiece). Use load_tokenizer with your model's tokenizer."
        )
    backend = sentencepiece_backend(mistral_v1_sentencepiece_file())
    tokenizer = _fast_tokenizer_from_backend(
        backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True, add_eos_token=False,
    )
    return _prepare_tokenizer(tokenizer, template)


def save_tokenizer(tokenizer, template: str | Template, out_dir: str) -> None:
    """Save a tokenizer (from `load_tokenizer` / `make_tokenizer`) so plain `AutoTokenizer.from_pretrained` gives it
    back exactly; for export next to model weights too.

    Writes the HF files (tokenizer.json, tokenizer_config.json, chat_template.jinja) with tokenizer_class
    "PreTrainedTokenizerFast": in transformers 4 and 5 alike it means "exactly tokenizer.json", whereas a Llama class
    name makes transformers 5 rebuild the pre-tokenizer from flags it does not save (losing `legacy`). Also writes
    `generation_config.json` with eos = the template's end-of-turn token, so `generate` stops there.

    Args:
        tokenizer: the tokenizer.
        template: its template (name or `Template`).
        out_dir: directory to write (created; existing files are overwritten).

    Raises:
        RuntimeError: the directory does not load back to the same tokenizer.
    """
    from transformers import AutoTokenizer

    template = get_template(template)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, ensure_ascii=False)
    generation_config = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids(template.eot),
        "pad_token_id": tokenizer.pad_token_id,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as handle:
        json.dump(generation_config, handle, indent=2)
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if tokenizer_fingerprint(reloaded) != tokenizer_fingerprint(tokenizer):
        raise RuntimeError(f"{out_dir}: the saved tokenizer does not load back identically")


def build_tokenizer(template_name: str, out_dir: str):
    """Write an HF tokenizer directory for a template, offline, that loads with `AutoTokenizer.from_pretrained`.

    For Mistral-based templates: Mistral-7B-v0.1's SentencePiece (from `mistral-common`) + the template's special
    tokens (openchat_3.5: `<|end_of_turn|>` = 32000, `<|pad_0|>` = 32001), eos = end-of-turn, the chat template.
    `tokenizer.json` itself carries the legacy SentencePiece behaviour (see `save_tokenizer`). Also writes
    `generation_config.json` (eos = end-of-turn) and the SentencePiece model as `tokenizer.model` (for other tools).

    Args:
        template_name: a template whose base tokenizer is available offline.
        out_dir: directory to write (created; existing files are overwritten).

    Returns:
        The tokenizer, loaded back from `out_dir` with `AutoTokenizer.from_pretrained`.

    Raises:
        ValueError: unknown template, or one whose base tokenizer is not available offline.
    """
    from transformers import AutoTokenizer

    tokenizer = make_tokenizer(template_name)
    save_tokenizer(tokenizer, template_name, out_dir)
    shutil.copyfile(mistral_v1_sentencepiece_file(), os.path.join(out_dir, "tokenizer.model"))
    return AutoTokenizer.from_pretrained(out_dir)


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of everything that decides token ids: vocab, merges, pipeline, added/special tokens, template.

    Args:
        tokenizer: a fast tokenizer.

    Returns:
        A hex sha256 string (equal for the same tokenizer in any process).
    """
    backend_json = _backend_json(tokenizer)
    backend_json.pop("truncation", None)
    backend_json.pop("padding", None)
    payload = {
        "backend": backend_json,
        "special_tokens": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "len": len(tokenizer),
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_main(argv: list[str]) -> int:
    """`crlft tokenizer TEMPLATE DIR`: write the template's tokenizer directory offline.

    Args:
        argv: the arguments after `tokenizer`.

    Returns:
        The exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="crlft tokenizer", description="Write an HF tokenizer directory for a template (offline).",
    )
    parser.add_argument("template", help=f"one of: {', '.join(sorted(TEMPLATES))}")
    parser.add_argument("dir", help="output directory")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.template, args.dir)
    template = get_template(args.template)
    print(
        f"wrote {args.dir}: {len(tokenizer)} tokens, "
        + ", ".join(f"{token}={tokenizer.convert_tokens_to_ids(token)}" for token in template.special_tokens)
        + f", eos={tokenizer.eos_token}"
    )
    return 0
