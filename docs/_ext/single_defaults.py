"""A Griffe extension for the API reference: say each parameter's default once.

The docstrings follow the house style (Google style, ``Default: ...`` at the end of an argument's
description), which reads well in ``help()``; the site's parameter lists already print the
default from the signature ("(int, default: 1)"), so the trailing sentence would say it twice.
This drops that last ``Default:`` sentence from a parameter's description on the site, where the
signature has a default. Loaded by ``mkdocs.yml``; not part of the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# the description's last sentence, when it is "Default: ..." (one sentence, nothing after it)
_TRAILING_DEFAULT = re.compile(r"\s*Default: (?P<what>(?:[^\n]|\n(?!\n))*?)\.?\s*$")


def strip_trailing_default(description: str) -> str:
    """``description`` without a final one-sentence ``Default: ...``; unchanged otherwise."""
    match = _TRAILING_DEFAULT.search(description)
    if match is None or re.search(r"\.\s", match.group("what")):
        return description
    return description[: match.start()]


class SingleDefaults(griffe.Extension):
    """Drop the docstrings' trailing ``Default: ...`` where the rendered signature shows it."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every parameter section of the package once it is loaded."""
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            stack.extend(member for member in obj.members.values() if not member.is_alias)
            if obj.docstring is None:
                continue
            for section in obj.docstring.parsed:
                if section.kind is not griffe.DocstringSectionKind.parameters:
                    continue
                for param in section.value:
                    if param.default is not None:
                        param.description = strip_trailing_default(param.description)
