"""A griffe extension for the API reference: invnet's docstrings title their doctests
``Example:`` (singular), which Google-style parsing treats as an admonition of Markdown
text; read it as the ``Examples:`` section, so the doctest lines render as code."""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class SingularExample(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
