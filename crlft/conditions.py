"""The recipe's classes at inference: which condition an export answers with by default, and the check that a
template can carry the sources' conditions at all.

C-RLFT prompts the trained model with its best class. The export's chat template, ``crlft chat`` and anything
that calls ``apply_chat_template`` without a ``condition`` get that class; with a template that has no conditions
(``chatml``, ...) the classes would render identically and C-RLFT would silently become weighted SFT, so such a
recipe is refused unless ``data.drop_conditions`` says that is meant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from crlft.templates import TEMPLATES, Template

if TYPE_CHECKING:  # config imports this module for its rules
    from crlft.config import Recipe


def condition_templates() -> list[str]:
    """Names of the templates that put a condition into the role prefixes."""
    return sorted(name for name, t in TEMPLATES.items() if t.uses_condition)


def best_condition(recipe: Recipe) -> str:
    """The condition an export of this recipe answers with by default.

    ``model.inference_condition`` when set; else the condition of the highest-reward source (the first listed on a
    tie). An ``openchat``-format source without a condition of its own is skipped (its records carry theirs);
    when no source is left, the template's own default. A template without conditions gives "".
    """
    template = TEMPLATES.get(recipe.model.template)
    if template is None or not template.uses_condition:
        return ""
    if recipe.model.inference_condition is not None:
        return recipe.model.inference_condition
    candidates = [s for s in recipe.data.sources if s.condition or s.format != "openchat"]
    if not candidates:
        return template.inference_condition
    return max(candidates, key=lambda s: s.reward).condition  # max keeps the first of equal rewards


def inference_template(recipe: Recipe) -> Template:
    """The recipe's template with :func:`best_condition` as the chat template's default condition."""
    template = TEMPLATES[recipe.model.template]
    if not template.uses_condition:
        return template
    return dataclasses.replace(template, inference_condition=best_condition(recipe))


def condition_rules(recipe: Recipe) -> Iterator[tuple[bool, tuple, str]]:
    """``Recipe.validate`` rules: conditions need a template that renders them (see the module docstring)."""
    template = TEMPLATES.get(recipe.model.template)
    if template is None or template.uses_condition:
        return
    conditioned = [f"{s.name} ({s.condition})" for s in recipe.data.sources if s.condition]
    yield (not conditioned or recipe.data.drop_conditions, ("model", "template"),
           f"template {template.name!r} has no conditions, but source(s) {', '.join(conditioned)} carry one: their "
           "classes would render identically and C-RLFT would become reward-weighted SFT. Use a template with "
           f"conditions ({', '.join(condition_templates())}), or set data.drop_conditions: true to train without them")
    yield (recipe.model.inference_condition is None, ("model", "inference_condition"),
           f"template {template.name!r} has no conditions; leave this null")


__all__ = ["best_condition", "condition_rules", "condition_templates", "inference_template"]
