"""Every Python snippet in README.md and docs/*.md runs, and docs/api.md covers the public API.

Snippets: each fenced ```python block runs. The blocks of one page share a namespace and run in
order, like a notebook, so a page may build on its earlier blocks. A block whose first line starts
with ``>>>`` is a doctest: its printed output is checked too. A block may opt out only with an
HTML comment ``<!-- skip-test -->`` on the line right before its fence, for code that cannot run
on a CPU (CUDA-only); the opt-outs are counted so they stay rare.

API reference: docs/api.md is generated from the docstrings by mkdocstrings (``mkdocs build
--strict``, run by CI, fails on a docstring it cannot parse or a parameter it does not know). Here:
every name in ``chunkconv.__all__`` and ``chunkconv.testing.__all__`` has a ``::: chunkconv.name``
directive there, every directive names something that exists, and the examples in the docstrings
of what the page shows run, like the snippets in the pages.

Links: a page that points outside docs/ uses the repository's URL (the site has no copy of the
examples), and the file it names exists.
"""

from __future__ import annotations

import doctest
import importlib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import chunkconv

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SKIP_MARK = "<!-- skip-test -->"
MAX_SKIPPED = 3

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skipped: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, indent = i, len(match["indent"])
        i += 1
        while i < len(lines) and not re.match(r"^ *```\s*$", lines[i]):
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: code fence is never closed")
        body = "\n".join(line[indent:] for line in lines[start + 1 : i])
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(page, start + 1, match["lang"], body, previous == SKIP_MARK))
        i += 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.lang in ("python", "py", "python3", "pycon")]


def _run_block(block: Block, namespace: dict) -> None:
    code = textwrap.dedent(block.code)
    if code.lstrip().startswith(">>>"):
        parser = doctest.DocTestParser()
        test = parser.get_doctest(code, namespace, block.where, str(block.page), block.line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        failures: list[str] = []
        runner.run(test, out=failures.append, clear_globs=False)
        assert runner.failures == 0, f"doctest in {block.where} failed:\n" + "".join(failures)
        return
    # Pad with blank lines so that tracebacks give the line number in the Markdown file.
    source = "\n" * block.line + code
    exec(compile(source, str(block.page), "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_snippets_run(page: Path):
    blocks = python_blocks(page)
    namespace: dict = {"__name__": f"doc_{page.stem}"}
    torch.manual_seed(0)
    for block in blocks:
        if block.skipped:
            continue
        try:
            _run_block(block, namespace)
        except AssertionError:
            raise
        except Exception as error:
            raise AssertionError(f"the snippet at {block.where} raised {type(error).__name__}: {error}") from error


def test_skipped_snippets_are_rare():
    skipped = [b.where for page in PAGES for b in python_blocks(page) if b.skipped]
    assert len(skipped) <= MAX_SKIPPED, f"too many snippets opt out of testing: {skipped}"


def test_docs_have_snippets_and_fences_parse():
    blocks = [b for page in PAGES for b in fenced_blocks(page)]
    assert sum(b.lang == "python" for b in blocks) >= 10  # the extraction really finds the snippets


def test_extraction_understands_skip_marks_and_doctests(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n```python\nx = 1\n```\n\n<!-- skip-test -->\n```python\nraise SystemExit\n```\n\n"
        "```bash\nexit 1\n```\n\n  ```python\n  >>> x + 1\n  2\n  ```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.skipped) for b in blocks] == [(3, False), (8, True), (16, False)]
    namespace: dict = {}
    for block in blocks:
        if not block.skipped:
            _run_block(Block(ROOT / "README.md", block.line, block.lang, block.code, False), namespace)
    wrong = Block(ROOT / "README.md", 1, "python", ">>> x + 1\n3\n", False)
    with pytest.raises(AssertionError, match="doctest"):
        _run_block(wrong, namespace)


# --------------------------------------------------------------------------------------------
# docs/api.md

API = ROOT / "docs" / "api.md"
# "::: chunkconv.name", optionally followed by an indented "options:" block
_DIRECTIVE = re.compile(r"^::: (?P<name>[\w.]+)\s*$", flags=re.MULTILINE)
# "options:\n  members: [a, b]" under a directive: those members are rendered too
_MEMBERS = re.compile(
    r"^::: (?P<name>[\w.]+)\n(?:    .*\n)*?      members: \[(?P<members>[\w, ]*)\]", flags=re.MULTILINE
)


def api_directives() -> list[str]:
    return _DIRECTIVE.findall(API.read_text(encoding="utf-8"))


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_api_reference_covers_all_public_names():
    testing = importlib.import_module("chunkconv.testing")
    documented = set(api_directives())
    public = [f"chunkconv.{name}" for name in chunkconv.__all__]
    public += [f"chunkconv.testing.{name}" for name in testing.__all__]
    missing = sorted(name for name in public if name not in documented)
    assert not missing, f"docs/api.md has no `::: name` directive for {missing}"
    twice = sorted({name for name in api_directives() if api_directives().count(name) > 1})
    assert not twice, f"docs/api.md documents {twice} twice"


@pytest.mark.parametrize("name", api_directives())
def test_api_directive_names_something_that_exists(name: str):
    _resolve(name)


def _documented_objects() -> list[tuple[str, object]]:
    """The objects docs/api.md renders: each directive's, and the members it lists."""
    text = API.read_text(encoding="utf-8")
    members = {m["name"]: [x.strip() for x in m["members"].split(",") if x.strip()] for m in _MEMBERS.finditer(text)}
    objects = []
    for name in api_directives():
        objects.append((name, _resolve(name)))
        objects += [(f"{name}.{member}", _resolve(f"{name}.{member}")) for member in members.get(name, [])]
    return objects


def test_api_members_options_are_read():
    names = [name for name, _ in _documented_objects()]
    assert "chunkconv.DynamicConv.plan" in names  # the members regex really finds `members: [plan]`


@pytest.mark.parametrize("name", [name for name, _ in _documented_objects()])
def test_docstring_examples_run(name: str):
    obj = dict(_documented_objects())[name]
    if isinstance(obj, property):
        obj = obj.fget
    module = sys.modules[getattr(obj, "__module__", None) or "chunkconv"]
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    for test in finder.find(obj, name, module=False, globs=dict(vars(module))):
        failures: list[str] = []
        runner.run(test, out=failures.append)
        assert not runner.failures, f"the docstring example of {name} failed:\n" + "".join(failures)


def test_some_docstrings_have_examples():
    finder = doctest.DocTestFinder(recurse=False)
    with_examples = [
        name
        for name, obj in _documented_objects()
        if any(t.examples for t in finder.find(obj, name, module=False, globs={}))
    ]
    assert len(with_examples) >= 5, with_examples  # the finder really sees the Examples sections


# --------------------------------------------------------------------------------------------
# links out of docs/

_PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
REPOSITORY = re.search(r'^Repository = "(?P<url>[^"]+)"', _PYPROJECT, flags=re.MULTILINE)["url"]
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_out_of_docs_use_the_repository_url(page: Path):
    text = page.read_text(encoding="utf-8")
    for match in _LINK.finditer(text):
        target = match["target"]
        line = text.count("\n", 0, match.start()) + 1
        assert not target.startswith("../"), (
            f"{page.relative_to(ROOT)}:{line}: {target} leaves docs/, which the site does not have; "
            f"link to {REPOSITORY}/blob/main/... instead"
        )
        if target.startswith(REPOSITORY + "/"):
            path = re.sub(r"^(?:blob|tree)/[^/]+/", "", target[len(REPOSITORY) + 1 :]).split("#")[0]
            assert (ROOT / path).exists(), (
                f"{page.relative_to(ROOT)}:{line}: {target} names {path}, which does not exist"
            )


def test_the_site_says_each_default_once():
    """docs/_ext/single_defaults.py drops a trailing one-sentence ``Default: ...`` (the site prints the signature's)."""
    import importlib.util

    pytest.importorskip("griffe")  # the docs extra
    path = Path(__file__).resolve().parents[1] / "docs" / "_ext" / "single_defaults.py"
    spec = importlib.util.spec_from_file_location("single_defaults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    strip = module.strip_trailing_default
    assert strip("as for ``nn.Conv*d``. Default: ``1``.") == "as for ``nn.Conv*d``."
    assert strip("bytes, or a fraction.\n    Default: ``None``.") == "bytes, or a fraction."
    assert strip("a float in (0, 1]. Default: 0.5.") == "a float in (0, 1]."
    kept = "Default: ``auto``. The planner picks it."  # more after the default: a sentence to keep
    assert strip(kept) == kept
    assert strip("no default here.") == "no default here."


def test_ci_runs_the_readmes_two_quick_start_commands_test_one_verbatim():
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", quick, re.DOTALL)
    assert commands is not None, "README's Quick start has no bash block"
    lines = commands.group(1).strip().splitlines()
    assert len(lines) == 2, lines
    test_command = lines[1]
    assert test_command.endswith("python -m pytest -q"), test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
