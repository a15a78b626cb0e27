"""What `pip install chunkconv` brings: no test library at runtime, one version, a changelog.

CI also builds the wheel, installs it into a fresh venv and runs it (`.ci/package-check`); these
tests are the fast half that runs with the suite.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chunkconv

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()


def test_testing_names_the_extra_when_hypothesis_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # `import hypothesis` now fails
    monkeypatch.delitem(sys.modules, "chunkconv.testing", raising=False)
    with pytest.raises(
        ImportError, match=re.escape('chunkconv.testing needs hypothesis: pip install "chunkconv[testing]"')
    ) as info:
        importlib.import_module("chunkconv.testing")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised `from None`


def test_import_chunkconv_imports_no_optional_dependency():
    optional = [
        "hypothesis",
        "pytest",
        "triton",
        "matplotlib",
        "tqdm",
        "chunkconv.testing",
        "dask",
        "distributed",
        "zarr",
    ]
    # torch itself may import some of them where they are installed (tqdm, for torch.hub): only
    # what `import chunkconv` adds to `import torch` counts
    code = (
        "import sys, torch; before = set(sys.modules); import chunkconv; "
        f"print([m for m in {optional!r} if m in sys.modules and m not in before])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"`import chunkconv` imported {out.stdout.strip()}"


def test_runtime_dependencies_are_torch_and_psutil():
    project = PYPROJECT["project"]
    assert {_name(r) for r in project["dependencies"]} == {"torch", "psutil"}
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["testing"]} == {"hypothesis"}
    # the suite needs the testing extra and the optional backends it exercises
    test = {_name(r) for r in extras["test"]}
    assert {"pytest", "hypothesis", "triton"} <= test
    assert "triton" in {_name(r) for r in extras["triton"]}


def test_the_version_has_one_source():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "chunkconv._version.__version__"
    from chunkconv._version import __version__

    assert chunkconv.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", __version__)


def test_changelog_has_this_version_and_an_unreleased_section():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert headings and headings[0] == "Unreleased", "CHANGELOG.md starts with an [Unreleased] section"
    assert chunkconv.__version__ in headings, f"CHANGELOG.md has no section for {chunkconv.__version__}"
