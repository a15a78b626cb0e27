"""A Griffe extension for the API reference: document the functions made by a factory.

``chunkconv.dynamic_conv`` and ``dynamic_conv1d/2d/3d`` are made at import time by
``chunkconv.functional._functional``, which writes their docstrings; reading the source, as
mkdocstrings does, finds only ``dynamic_conv = _functional(None, "dynamic_conv")``. This
replaces each such attribute with the live function, its signature and docstring included.
Loaded by ``mkdocs.yml``; not part of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe


class FunctionalForms(griffe.Extension):
    """Give griffe the signatures of the functions ``_functional`` makes."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Attach the generated functions' signatures once the package is loaded."""
        if pkg.name != "chunkconv":
            return
        static = pkg["functional"]
        made = [
            name
            for name, member in static.members.items()
            if not member.is_alias and member.is_attribute and str(member.value).startswith("_functional(")
        ]
        if not made:
            return
        root = Path(static.filepath).resolve().parent.parent  # the checkout being documented
        live = griffe.inspect(
            "chunkconv.functional", import_paths=[root, *sys.path], docstring_parser=loader.docstring_parser
        )
        imported = Path(str(sys.modules["chunkconv.functional"].__file__)).resolve()
        if imported != Path(static.filepath).resolve():
            raise RuntimeError(
                f"documenting {static.filepath}, but Python imported {imported}: "
                "run mkdocs from the checkout's own environment (pip install -e .)"
            )
        for name in made:
            function = live[name]
            function.lineno, function.endlineno = static[name].lineno, static[name].endlineno
            static.set_member(name, function)
