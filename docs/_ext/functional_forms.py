"""A Griffe extension for the API reference: document what a factory makes or a loop documents.

``chunkconv.dynamic_conv`` and ``dynamic_conv1d/2d/3d`` are made at import time by
``chunkconv.functional._functional``, which writes their docstrings; reading the source, as
mkdocstrings does, finds only ``dynamic_conv = _functional(None, "dynamic_conv")``. Likewise
``chunkconv.ops.deform_conv1d/2d/3d`` (made by ``_deform_conv``), and ``DeformConv1d/2d/3d``,
whose full docstrings a loop formats after the classes. This replaces each such function with
the live one, its signature and docstring included, and gives each such class its live
docstring. Loaded by ``mkdocs.yml``; not part of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

# module -> the factory whose calls make its documented functions
_FACTORIES = {"functional": "_functional(", "ops": "_deform_conv("}


class FunctionalForms(griffe.Extension):
    """Give griffe the signatures and docstrings of what chunkconv writes at import time."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Attach the generated functions and docstrings once the package is loaded."""
        if pkg.name != "chunkconv":
            return
        for module, factory in _FACTORIES.items():
            _attach(pkg[module], f"chunkconv.{module}", factory, loader)


def _attach(static: Any, path: str, factory: str, loader: griffe.GriffeLoader) -> None:
    made = [
        name
        for name, member in static.members.items()
        if not member.is_alias and member.is_attribute and str(member.value).startswith(factory)
    ]
    if not made:
        return
    root = Path(static.filepath).resolve().parent.parent  # the checkout being documented
    live = griffe.inspect(path, import_paths=[root, *sys.path], docstring_parser=loader.docstring_parser)
    imported = Path(str(sys.modules[path].__file__)).resolve()
    if imported != Path(static.filepath).resolve():
        raise RuntimeError(
            f"documenting {static.filepath}, but Python imported {imported}: "
            "run mkdocs from the checkout's own environment (pip install -e .)"
        )
    for name in made:
        function = live[name]
        function.lineno, function.endlineno = static[name].lineno, static[name].endlineno
        static.set_member(name, function)
    for name, member in static.members.items():  # classes whose docstring is formatted at import
        if member.is_alias or not member.is_class or name not in live.members:
            continue
        written = live[name].docstring
        if written is not None and (member.docstring is None or member.docstring.value != written.value):
            member.docstring = griffe.Docstring(written.value, parser=loader.docstring_parser, parent=member)
