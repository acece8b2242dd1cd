"""Reading a recipe: YAML, ``section.key=value`` overrides, pydantic's checks, ``Recipe.validate()``.

Every problem is listed in one ``UserError``, each located as ``file:line (section.key)``; an unknown key gets the
closest known one as a hint. Type errors come first: validation runs once the types are right.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from crlft.config import Recipe
from crlft.errors import UserError

_SECTION_NAMES = ("model", "data", "train", "deepspeed", "logging", "eval")

# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply ``section.key=value`` overrides, convert and validate it.

    Args:
        path: The recipe file.
        overrides: Command-line overrides, e.g. ``["train.lr=1e-5", "data.sources.0.reward=0.5"]``; the value is
            parsed as YAML (``null``, numbers, booleans, lists).

    Returns:
        The validated recipe.

    Raises:
        UserError: A missing file, invalid YAML, an unknown key, a wrong type or any validation problem.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}") from None
    try:
        raw = yaml.load(text, Loader=RecipeLoader) or {}
        lines = _key_lines(yaml.compose(text, Loader=RecipeLoader))
    except DuplicateKeyError as e:
        raise UserError(f"{path}:{e.second_line} ({e.key_path}): written twice (lines {e.first_line} and "
                        f"{e.second_line}); YAML would silently keep the last value. Remove one of them") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, data, ...), not {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return recipe_from_dict(raw, source_path=path, lines=lines)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that holds the same key twice; ``first_line`` and ``second_line`` are 1-based."""

    def __init__(self, key_path: str, first_line: int, second_line: int):
        super().__init__(f"{key_path}: duplicate key (lines {first_line} and {second_line})")
        self.key_path, self.first_line, self.second_line = key_path, first_line, second_line


class RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key written twice in one mapping is an error, not the last one."""

    def construct_document(self, node):
        self._crlft_root = node  # for naming a duplicated key with its section
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(_dotted_key(self, node, key), seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


def _dotted_key(loader: RecipeLoader, node: yaml.MappingNode, key: Any) -> str:
    """The duplicated key with the keys leading to its mapping, e.g. ``train.lr`` (found by walking the document)."""
    root = getattr(loader, "_crlft_root", None)
    path = _path_to(root, node) if root is not None else None
    return ".".join(str(part) for part in (*(path or ()), key))


def _path_to(root: yaml.Node, target: yaml.Node, prefix: tuple = ()) -> tuple | None:
    if root is target:
        return prefix
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            found = _path_to(value_node, target, prefix + (key_node.value,))
            if found is not None:
                return found
    elif isinstance(root, yaml.SequenceNode):
        for i, item in enumerate(root.value):
            found = _path_to(item, target, prefix + (i,))
            if found is not None:
                return found
    return None


def recipe_from_dict(raw: dict[str, Any], source_path: str | None = None, lines: dict | None = None) -> Recipe:
    """Convert plain data (as from YAML) into a validated ``Recipe``; see ``load_recipe``."""
    lines = lines or {}

    def where(key_path: tuple) -> str:
        line = lines.get(key_path)
        dotted = ".".join(str(k) for k in key_path) or "<top>"
        if source_path is None:
            return dotted
        return f"{source_path}:{line} ({dotted})" if line else f"{source_path} ({dotted})"

    errors: list[str] = []
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _SECTION_NAMES:
            errors.append(f"{where((key,))}: {_unknown_key(key, list(_SECTION_NAMES))}")
            continue
        section_type = typing.get_type_hints(Recipe)[key]
        try:
            sections[key] = _adapter(section_type).validate_python(value)
        except ValidationError as e:
            errors.extend(f"{where((key, *path))}: {message}" for path, message in _problems(e, section_type))
    if errors:
        raise UserError(f"{len(errors)} problem(s) in {source_path or 'recipe'}:\n  " + "\n  ".join(errors))
    recipe = Recipe(**sections, source_path=source_path, _lines=lines)
    if isinstance(recipe.train.resume, bool):
        recipe.train.resume = "auto" if recipe.train.resume else "off"
    recipe.validate()
    return recipe


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value_text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as e:
        raise UserError(f"override {override!r}: value is not valid YAML: {e}") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {override!r}: {'.'.join(parts[:i])} has no item {part}")
            node = node[int(part)]
        else:
            if node.get(part) is None:  # absent, or written as an empty section
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise UserError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override {override!r}: {'.'.join(parts[:-1])} has no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, prefix + (i,)))
    return lines


@functools.cache
def _adapter(section_type: type) -> TypeAdapter:
    return TypeAdapter(section_type)


def _problems(error: ValidationError, section_type: type) -> list[tuple[tuple, str]]:
    """Pydantic's errors as ``(key path, message)``, one per key (a union reports once, not once per member)."""
    problems: dict[tuple, str] = {}
    for e in error.errors():
        path, tp, parent = _walk(section_type, e["loc"])
        if parent is not None:
            message = _unknown_key(path[-1], [f.name for f in dataclasses.fields(parent)])
        elif e["type"] == "finite_number":  # wins over the other members of a union (lr: number or 'auto')
            problems[path] = f"must be a finite number, got {e['input']!r}"
            continue
        else:
            message = _expected(tp, e["input"])
        problems.setdefault(path, message)
    return list(problems.items())


def _walk(section_type: type, loc: tuple) -> tuple[tuple, Any, type | None]:
    """The key path an error location names, the type expected there, and the section when the key is unknown.

    Locations also name the member of a union that failed (``lr.float``); the walk stops at such a name.
    """
    tp, path = section_type, []
    for item in loc:
        bare = _unwrap(tp)
        if dataclasses.is_dataclass(bare) and isinstance(item, str):
            hints = typing.get_type_hints(bare, include_extras=True)
            path.append(item)
            if item not in hints:
                return tuple(path), None, bare
            tp = hints[item]
        elif isinstance(item, int) and typing.get_origin(bare) is list:
            tp = typing.get_args(bare)[0]
            path.append(item)
        else:
            break
    return tuple(path), tp, None


# Other trainers' names (Hugging Face Trainer, TRL, axolotl) for crlft's keys: (section, key).
OTHER_TRAINERS_NAMES = {
    "learning_rate": ("train", "lr"),
    "num_train_epochs": ("train", "epochs"),
    "num_epochs": ("train", "epochs"),
    "max_seq_length": ("model", "max_context"),
    "max_length": ("model", "max_context"),
    "sequence_len": ("model", "max_context"),
    "gradient_accumulation_steps": ("train", "grad_accum"),
    "warmup_ratio": ("train", "lr_warmup_ratio"),
    "max_grad_norm": ("train", "grad_clip"),
    "save_steps": ("train", "save_every_steps"),
    "save_total_limit": ("train", "keep_last"),
    "logging_steps": ("logging", "log_every"),
    "model_name_or_path": ("model", "base"),
    "chat_template": ("model", "template"),
    "adam_beta1": ("train", "betas"),
    "adam_beta2": ("train", "betas"),
    "adam_epsilon": ("train", "eps"),
    "bf16": ("model", "dtype"),
}


def _unknown_key(key: Any, known: list[str]) -> str:
    alias = OTHER_TRAINERS_NAMES.get(str(key))
    if alias is not None:
        section_name, name = alias
        target = name if name in known else f"{section_name}.{name}"
        return f"unknown key {key!r}; did you mean {target!r}? (crlft's name for it)"
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown key {key!r}{hint}"


def _expected(tp: Any, value: Any) -> str:
    bare = _unwrap(tp)
    if typing.get_origin(bare) is Literal:
        return f"must be one of {', '.join(repr(a) for a in typing.get_args(bare))}, got {value!r}"
    return f"expected {_type_name(tp)}, got {value!r}"


def _unwrap(tp: Any) -> Any:
    """The type under ``Annotated[...]`` and ``X | None``."""
    if typing.get_origin(tp) is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _type_name(tp: Any) -> str:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
