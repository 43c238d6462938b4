"""Every code block of README.md and docs/*.md runs here, so the documentation cannot drift from the code.

How a page runs (``run_page``):
- its ``python`` blocks run in order in one namespace, in a fresh temporary folder, so a page reads as one
  session: a later block may use what an earlier one defined, and files it wrote;
- a ``bash`` block runs line by line (comments stripped) in the same folder when the page reaches it: a
  ``polyak ...`` line through ``polyak.cli.main`` in this process (a trailing ``> FILE`` is honoured),
  any other line in a shell with this environment's ``bin`` first on ``PATH``;
- a line ending in ``# prints: TEXT`` states output: the block's stdout lines must equal those TEXTs, in
  order (the migration guide's matched numbers are checked this way);
- a block whose first line is ``# not run by the doc tests: REASON`` is skipped; readers see the reason.
  ``test_few_blocks_are_skipped`` keeps that list short.
Blocks in any other language (``text``, ``yaml``) are output or configuration, not code.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import io
import os
import re
import shlex
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "# not run by the doc tests:"
PRINTS = re.compile(r"#\s*prints:\s*(.*?)\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
# Warnings that third-party frameworks raise on the pages' tiny runs (the same as tests/integrations/).
PAGE_WARNINGS = {
    "integrations.md": [
        ("ignore", r".*does not have many workers", UserWarning),
        ("ignore", r".*LeafSpec.*is deprecated", FutureWarning),
        ("ignore", r".*smaller than the logging interval", UserWarning),
        ("ignore", r".*Checkpoint directory .* exists and is not empty", UserWarning),
    ],
}


class Block(NamedTuple):
    lang: str
    code: str
    line: int


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group("indent"))
        code = "\n".join(line[indent:] for line in m.group("body").splitlines())
        out.append(Block(m.group("lang") or "text", code, text.count("\n", 0, m.start()) + 1))
    return out


def _peer_modules() -> dict[str, types.ModuleType]:
    """timm's and Ultralytics' EMA code under their usual import paths (their packages need torchvision/cv2)."""
    from tests import peers

    found: dict[str, types.ModuleType] = {}
    timm = peers.timm_model_ema()
    if timm is not None:
        found.update({"timm": types.ModuleType("timm"), "timm.utils": types.ModuleType("timm.utils")})
        found["timm.utils.model_ema"] = timm
        found["timm.utils"].ModelEmaV3 = timm.ModelEmaV3  # type: ignore[attr-defined]
    model_ema = peers.ultralytics_model_ema()
    if model_ema is not None:
        torch_utils = types.ModuleType("ultralytics.utils.torch_utils")
        torch_utils.ModelEMA = model_ema  # type: ignore[attr-defined]
        found.update(
            {
                "ultralytics": types.ModuleType("ultralytics"),
                "ultralytics.utils": types.ModuleType("ultralytics.utils"),
                "ultralytics.utils.torch_utils": torch_utils,
            }
        )
    for name, module in found.items():  # others look these up with importlib.util.find_spec (diffusers)
        if getattr(module, "__spec__", None) is None:
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package="." not in name)
    return found


def _polyak(command: str) -> tuple[int, str, str]:
    """Run a ``polyak ...`` line through ``polyak.cli.main`` in this process (no second torch import);
    a trailing ``> FILE`` writes stdout there, as the shell would."""
    from polyak.cli import main

    argv = shlex.split(command)[1:]
    target = None
    if len(argv) >= 2 and argv[-2] == ">":
        argv, target = argv[:-2], argv[-1]
    assert not set(argv) & {">", ">>", "|", "&&", ";"}, f"`{command}`: only a trailing '> FILE' is supported"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # --version, --help
            code = int(exc.code or 0)
    if target is not None:
        Path(target).write_text(out.getvalue(), encoding="utf-8")
        return code, "", err.getvalue()
    return code, out.getvalue(), err.getvalue()


def run_page(page: Path, folder: Path) -> int:
    """Run every block of ``page`` in ``folder``; return how many ran."""
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    ran = 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for block in blocks(page):
        where = f"{page.name}:{block.line}"
        if block.code.lstrip().startswith(SKIP) or block.lang not in ("python", "bash"):
            continue
        expected = [m.group(1) for line in block.code.splitlines() if (m := PRINTS.search(line))]
        if block.lang == "python":
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                try:
                    exec(compile(block.code, where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"{where}: the python block raised {type(exc).__name__}: {exc}") from exc
            printed = stdout.getvalue().splitlines()
        else:
            printed = []
            for raw in block.code.splitlines():
                command = re.sub(r"(^|\s)#.*$", "", raw).strip()
                if not command:
                    continue
                if command.startswith("polyak "):
                    code, out, err = _polyak(command)
                else:
                    done = subprocess.run(
                        command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=300
                    )
                    code, out, err = done.returncode, done.stdout, done.stderr
                assert code == 0, f"{where}: `{command}` exited {code}:\n{err[-2000:]}"
                printed += out.splitlines()
        if expected:
            assert printed == expected, f"{where}: the block printed {printed}, the page says {expected}"
        ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numpy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if page.name == "migration.md":
        for name, module in _peer_modules().items():
            monkeypatch.setitem(sys.modules, name, module)
    with warnings.catch_warnings():
        for action, message, category in PAGE_WARNINGS.get(page.name, []):
            warnings.filterwarnings(action, message=message, category=category)
        run_page(page, tmp_path)


def test_few_blocks_are_skipped() -> None:
    skipped = [f"{p.name}:{b.line}" for p in PAGES for b in blocks(p) if b.code.lstrip().startswith(SKIP)]
    runnable = [b for p in PAGES for b in blocks(p) if b.lang in ("python", "bash")]
    assert len(skipped) <= max(8, len(runnable) // 5), f"too many blocks skipped: {skipped}"


def test_prints_markers_are_checked(tmp_path: Path) -> None:
    """The checker itself can fail: a page whose stated output is wrong is refused."""
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(1 + 1)  # prints: 3\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="the page says"):
        run_page(page, tmp_path)
    page.write_text("```python\nprint(1 + 1)  # prints: 2\n```\n```bash\nfalse\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="exited 1"):
        run_page(page, tmp_path)


FORBIDDEN = [
    (re.compile(r"\bsandbox\b", re.I), "speak of the machine ('2-core x86 CPU'), not a sandbox"),
    (re.compile(r"\bissue\s*#?\d+", re.I), "issue numbers belong in commit messages"),
    (re.compile(r"\bhelpers?\b", re.I), "say what was built, not who built it"),
    (re.compile(r"\b(commit|at)\s+[0-9a-f]{7,40}\b", re.I), "no commit hashes"),
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_about_the_product(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for pattern, why in FORBIDDEN:
        m = pattern.search(text)
        assert m is None, f"{page.name}: {m.group(0)!r} ({why})"


def test_readme_fits() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= 16_000, f"README.md is {size} bytes; move detail into docs/"


def test_nav_lists_every_page_and_only_pages() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = {next(iter(item.values())) for item in config["nav"]}
    present = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert present <= listed, f"pages missing from the nav: {sorted(present - listed)}"
    assert listed <= present, f"nav entries with no page: {sorted(listed - present)}"
