"""The package's dependencies point one way: the layering documented in the README, enforced.

Reads every module's imports (top-level and function-local, ``from . import x`` included) with
``ast`` and fails on an import from a higher layer than the importing module's, as import-linter's
"layers" contract does. The layers are read from the README's "Layering" table, so the document and
the test cannot drift apart; every module of the package must sit in exactly one layer.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chunkconv"


def _documented_layers() -> dict[str, int]:
    """Module (dotted, under ``chunkconv``) -> layer number, from the README's table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layering", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not row:
            continue
        for name in re.findall(r"`([\w.]+)`", row.group(2)):
            assert name not in layers, f"{name} is in two layers of the README's table"
            layers[name] = int(row.group(1))
    return layers


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _layer_of(module: str, layers: dict[str, int]) -> int:
    """A module's layer: its own entry, else its package's (``kernels.contract`` -> ``kernels``)."""
    name = module
    while name not in layers and "." in name:
        name = name.rsplit(".", 1)[0]
    assert name in layers, f"chunkconv.{module} is in no layer of the README's 'Layering' table"
    return layers[name]


def _imports(path: Path, module: str) -> set[str]:
    """The package modules ``path`` imports (dotted, under ``chunkconv``)."""
    package = module.split(".") if path.name == "__init__.py" and module != "__init__" else module.split(".")[:-1]
    if module == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "chunkconv":
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not target:  # from . import x, y: the submodules x and y
                found.update(".".join([*target, a.name]) for a in node.names)
            else:
                found.add(".".join(target))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "chunkconv":
                    found.add(".".join(a.name.split(".")[1:]) or "__init__")
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _normalise(target: str, modules: dict[str, Path]) -> str:
    """``x.name`` imported from a module ``x`` (not a package) is a name in ``x``."""
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in modules else "__init__"  # a name of the package itself


def test_every_module_is_in_one_documented_layer():
    layers = _documented_layers()
    for module in _modules():
        _layer_of(module, layers)
    stale = [name for name in layers if not any(m == name or m.startswith(name + ".") for m in _modules())]
    assert not stale, f"the README's 'Layering' table names modules that do not exist: {stale}"


def test_imports_point_down_the_documented_layers():
    layers, modules = _documented_layers(), _modules()
    wrong = []
    for module, path in sorted(modules.items()):
        mine = _layer_of(module, layers)
        for target in sorted(_imports(path, module)):
            target = _normalise(target, modules)
            theirs = _layer_of(target, layers)
            if theirs > mine:
                wrong.append(f"chunkconv.{module} (layer {mine}) imports chunkconv.{target} (layer {theirs})")
    assert not wrong, "imports against the README's layering:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_and_local_imports(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from .a import b\nfrom . import c, d\ndef f():\n    from ..e import g\n    import chunkconv.h\n")
    assert _imports(path, "pkg.x") == {"pkg.a", "pkg.c", "pkg.d", "e", "h"}
