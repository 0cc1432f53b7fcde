"""A griffe extension for the API reference (mkdocs.yml).

invnet's docstrings title their doctests ``Example:`` (singular, once with a title in
parentheses), which Google-style parsing reads as an admonition of Markdown text; read it as
the ``Examples:`` section instead, so the doctest lines render as code."""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example(?: \((.*)\))?:\s*$", re.M)


def _as_examples(match: re.Match) -> str:
    """``Example:`` -> ``Examples:``; ``Example (what):`` -> ``Examples: what``."""
    indent, title = match.group(1), match.group(2)
    return f"{indent}Examples: {title}" if title else f"{indent}Examples:"


class SingularExample(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(_as_examples, obj.docstring.value)
