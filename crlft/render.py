"""Rendering: a conversation → ``(input_ids, loss_weights)`` with a template and a tokenizer.

Each piece (role prefix, text, end-of-turn) is tokenized on its own and the ids concatenated, so the boundary
between a role prefix and the message text never depends on the text; typed control tokens stay text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from tokenizers import Tokenizer

from crlft.conversation import Conversation, Message, validate_conversation
from crlft.templates import Template, get_template
from crlft.tokenizer import backend_json

# Tokenizer plumbing


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
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"crlft needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
        self.template = template
        pipeline = backend_json(tokenizer)
        pipeline["truncation"] = None
        pipeline["padding"] = None
        # Segment start: text after a control token or at the start (gets the dummy prefix, like the whole string).
        self.start = Tokenizer.from_str(json.dumps(pipeline))
        self.start.encode_special_tokens = True
        # Continuation: text right after plain text.
        self.continuation = Tokenizer.from_str(json.dumps(_without_dummy_prefix(pipeline)))
        self.continuation.encode_special_tokens = True
        vocab = tokenizer.get_vocab()
        missing = [token for token in template.control_tokens if token not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks the control tokens {missing} of template {template.name!r}; "
                "load it with crlft.tokenizer.load_tokenizer"
            )
        self.control_ids = {token: vocab[token] for token in template.control_tokens}
        self.bos_ids = [tokenizer.bos_token_id] if template.add_bos and tokenizer.bos_token_id is not None else []
        # Every special token (eos `</s>` stays one after eos moved to the end-of-turn token): whole-string
        # tokenization, as of the exported chat template, turns each into its control id.
        self.named_tokens = tuple(dict.fromkeys([*(str(token) for token in tokenizer.all_special_tokens),
                                                 *(t.content for t in tokenizer.added_tokens_decoder.values()
                                                   if t.special)]))
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
    # The inference condition does not change how pieces are encoded (chat and eval vary it per call).
    template = dataclasses.replace(template, inference_condition="")
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
            problem = _condition_problem(condition, encoder)
            if problem:
                raise ValueError(f"conversation {conversation_index}: {problem}")
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


def condition_problem(condition: str, template: str | Template, tokenizer) -> str | None:
    """What makes a condition unusable with a template and tokenizer, or None when it is usable.

    The condition is written into the role prefixes, where control tokens are live: one typed inside it (the
    template's, or a named token of the tokenizer such as ``</s>``) would become a control id, so it is refused.
    """
    template = get_template(template)
    if not condition or not template.uses_condition:
        return None
    return _condition_problem(condition, _encoder_for(tokenizer, template))


def _condition_problem(condition: str, encoder: _Encoder) -> str | None:
    typed = list(dict.fromkeys(token for token in (*encoder.control_ids, *encoder.named_tokens) if token in condition))
    if not typed:
        return None
    return f"condition {condition!r} contains control token(s) {', '.join(typed)}"


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
