"""Every Python snippet in README.md and docs/*.md runs, and docs/api.md matches the code.

Snippets: each fenced ```python block runs. The blocks of one page share a namespace and run in
order, like a notebook, so a page may build on its earlier blocks. A block whose first line starts
with ``>>>`` is a doctest: its printed output is checked too. A block may opt out only with an
HTML comment ``<!-- skip-test -->`` on the line right before its fence, for code that cannot run
on a CPU (CUDA-only); the opt-outs are counted so they stay rare.

API reference: every name in ``chunkconv.__all__`` has an entry in docs/api.md, every entry names
something that exists, and every signature written there (a ```text block right under the entry's
heading) is ``inspect.signature`` of the object, with each of its parameters described in a
"- `name`:" (or "- `a`, `b`:") line of the entry.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
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
# "### `chunkconv.name`", or several names sharing one entry: "### `chunkconv.a`, `chunkconv.b`"
_ENTRY = re.compile(r"^### (?P<names>`[\w.]+`(?:, `[\w.]+`)*)\s*$")


def api_entries() -> dict[str, tuple[str | None, set[str]]]:
    """``{dotted name: (signature text or None, documented parameter names)}`` from docs/api.md.

    An entry shared by several names writes the signature once, for the first name; it holds for
    each of them with the name changed.
    """
    lines = API.read_text(encoding="utf-8").splitlines()
    entries: dict[str, tuple[str | None, set[str]]] = {}
    starts = [(i, re.findall(r"`([\w.]+)`", m["names"])) for i, line in enumerate(lines) if (m := _ENTRY.match(line))]
    for n, (i, names) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        body = lines[i + 1 : end]
        body = body[: next((j for j, line in enumerate(body) if line.startswith("## ")), len(body))]
        signature = None
        first = next((j for j, line in enumerate(body) if line.strip()), None)
        if first is not None and body[first].strip() == "```text":
            close = next(j for j in range(first + 1, len(body)) if body[j].strip() == "```")
            signature = " ".join(line.strip() for line in body[first + 1 : close])
        # "- `a`: ..." or "- `a`, `b`: ..." describes parameters a and b
        params = {
            name
            for m in re.finditer(r"^- ((?:`\w+`, )*`\w+`):", "\n".join(body), flags=re.MULTILINE)
            for name in re.findall(r"`(\w+)`", m[1])
        }
        short = names[0].split(".")[-1]
        for name in names:
            assert name not in entries, f"docs/api.md documents {name} twice"
            own = None if signature is None else re.sub(rf"^{short}\(", f"{name.split('.')[-1]}(", signature)
            entries[name] = (own, params)
    return entries


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


def _signature_text(dotted: str, obj) -> str:
    """``name(a, b=1, *, c=None)``: the signature without annotations, as api.md writes it."""
    sig = inspect.signature(obj)
    plain = sig.replace(
        parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    return f"{dotted.split('.')[-1]}{plain}"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_api_reference_covers_all_public_names():
    documented = set(api_entries())
    missing = sorted(f"chunkconv.{name}" for name in chunkconv.__all__ if f"chunkconv.{name}" not in documented)
    assert not missing, f"docs/api.md has no entry for {missing}"


@pytest.mark.parametrize("name", sorted(api_entries()))
def test_api_entry_matches_the_code(name: str):
    signature, params = api_entries()[name]
    obj = _resolve(name)  # the entry names something that exists
    if isinstance(obj, type) and issubclass(obj, BaseException):
        assert signature is None, f"{name}: exceptions need no signature"
        return
    if not callable(obj) or (isinstance(obj, type) and getattr(obj, "__dataclass_params__", None)):
        return  # data (e.g. Plan): documented by its fields, not constructed by users
    assert signature is not None, f"docs/api.md: the entry for {name} must start with its signature in a ```text block"
    want = _signature_text(name, obj)
    assert _normalise(signature) == _normalise(want), (
        f"docs/api.md: {name}\n  documented: {signature}\n  actual:     {want}"
    )
    actual_params = set(inspect.signature(obj).parameters) - {"self"}
    assert params == actual_params, (
        f"docs/api.md: {name} describes parameters {sorted(params)}, the code has {sorted(actual_params)}"
    )
