"""Tokenizers: the offline SentencePiece build, loading with a template's tokens, saving, and a fingerprint.

SentencePiece tokenizers (Llama / Mistral) are used in their exact "legacy" form: the dummy prefix ``▁`` goes before
every text segment, also right after a control token, as OpenChat 3.5 was trained.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from crlft.templates import MISTRAL_V1_SENTENCEPIECE, TEMPLATES, Template, get_template

logger = logging.getLogger(__name__)


def backend_json(tokenizer) -> dict:
    """The backend (``tokenizers``) pipeline of a fast tokenizer as JSON data."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


# SentencePiece (Llama / Mistral) semantics in `tokenizers` terms. The dummy prefix `▁` goes before every text segment
# (also after control tokens: the "legacy" behaviour OpenChat 3.5 was trained with), spaces become `▁`, and words are
# cut before each run of `▁` that follows other text; no SentencePiece piece spans such a cut, so the cut only makes
# BPE faster (its word cache) without changing the result.
_SP_PREPEND = {"type": "Prepend", "prepend": "▁"}
_SP_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
_SP_WORD_REGEX = "[^▁]+|▁+[^▁]*"


def _sentencepiece_normalizer():
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _sentencepiece_pre_tokenizer():
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
    # Building takes a second (merges from 32k pieces); reuse the result for the same file.
    return Tokenizer.from_str(_sentencepiece_backend_json(model_file, os.stat(model_file).st_mtime_ns))


def _build_sentencepiece_backend(model_file: str):
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
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def _exact_sentencepiece(tokenizer):
    """Return a tokenizer whose backend encodes exactly like SentencePiece (legacy), keeping all token ids.

    A tokenizer already carrying the exact pipeline (e.g. one written by `build_tokenizer`) is returned as is.
    """
    if not _is_sentencepiece_bpe(tokenizer.backend_tokenizer) or \
            _has_exact_sentencepiece_pipeline(tokenizer.backend_tokenizer):
        return tokenizer

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
    template = get_template(template)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # What apply_chat_template(..., sanitize_control_tokens=True) encodes as text when typed in a message: every
    # token the template writes as a control token (README, "Chat template and typed control tokens").
    config["chat_control_tokens"] = list(template.control_tokens)
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
    pipeline = backend_json(tokenizer)
    pipeline.pop("truncation", None)
    pipeline.pop("padding", None)
    payload = {
        "backend": pipeline,
        "special_tokens": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "len": len(tokenizer),
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
