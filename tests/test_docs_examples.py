"""Every fenced example in README.md and docs/ runs exactly as printed.

Each ```python block runs as a script with this interpreter, each ```sh block with bash
(the CLI on PATH), in a fresh temporary directory, with no hidden setup. Two markers,
on the line right before a fence, change that:

    <!-- continues -->         run in the previous block's directory, after it
    <!-- not run: REASON -->   never run (say why: CI runs it elsewhere, it needs a GPU...)
    <!-- output -->            (before a ```text block) the previous block's exact stdout

Output samples are ```text blocks; ```console blocks run their "$ " lines. A block in any
other language must be one that cannot run (text, json, toml, mermaid): a typo such as
```py fails the inventory test instead of passing silently.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = {"python", "sh", "console"}
NEVER_RUN = {"text", "json", "toml", "mermaid", "ini", "c"}
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(continues|output|not run:\s*(?P<why>[^-]*?))\s*-->\s*$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: str  # "", "continues", "output" or "not run"
    why: str = ""
    expected: "str | None" = None  # the exact stdout, from an output block after it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    if (ROOT / "docs").is_dir():
        files += sorted((ROOT / "docs").rglob("*.md"))
    return files


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mk = MARKER.search(before)
        marker, why = "", ""
        if mk:
            marker = mk.group(1) if mk.group(1) in ("continues", "output") else "not run"
            why = (mk.group("why") or "").strip()
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(path, line, m.group(1), m.group(2), marker, why))
    return out


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in blocks_of(p)]


def sessions(files: "list[Path] | None" = None) -> list[list[Block]]:
    """Runnable blocks grouped by directory: a block marked continues joins the one before."""
    out: list[list[Block]] = []
    for path in files if files is not None else doc_files():
        last = None
        for b in blocks_of(path):
            if b.marker == "output":
                assert last is not None and last.expected is None, f"{b.where}: output of what?"
                last.expected = b.code
                continue
            last = None
            if b.lang not in RUN or b.marker == "not run":
                continue
            last = b
            if b.marker == "continues":
                assert out and out[-1][0].path == path, f"{b.where}: continues, but no block before it"
                out[-1].append(b)
            else:
                out.append([b])
    return out


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_SAFETENSORS_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


def _run(block: Block, cwd: Path, scripts: Path, n: int) -> subprocess.CompletedProcess:
    env = _env()
    if block.lang == "python":
        script = scripts / f"block{n}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    else:
        code = block.code
        if block.lang == "console":
            code = "\n".join(ln[2:] for ln in code.splitlines() if ln.startswith("$ "))
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


SESSIONS = sessions()


@pytest.mark.parametrize("session", SESSIONS, ids=[s[0].where for s in SESSIONS])
def test_example_runs_as_printed(session, tmp_path):
    cwd = tmp_path / "work"
    scripts = tmp_path / "scripts"  # outside the example's directory, so ls shows only its files
    cwd.mkdir()
    scripts.mkdir()
    for n, block in enumerate(session):
        r = _run(block, cwd, scripts, n)
        assert r.returncode == 0, (
            f"{block.where} ({block.lang}) exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}"
            f"\n--- stderr\n{r.stderr[-3000:]}")
        if block.expected is not None:
            assert r.stdout == block.expected, f"{block.where}: the printed output differs"


def test_every_block_is_run_or_says_why_not():
    blocks = all_blocks()
    assert len(blocks) >= 10, "the runner found almost no examples: is the fence pattern right?"
    for b in blocks:
        assert b.lang, f"{b.where}: a fence without a language (use text for output)"
        assert b.lang in RUN | NEVER_RUN, f"{b.where}: language {b.lang!r} is neither run nor known"
        if b.marker == "not run":
            assert b.why, f"{b.where}: 'not run' needs a reason"
            assert b.lang in RUN, f"{b.where}: a {b.lang} block never runs; drop the marker"
        if b.marker == "continues":
            assert b.lang in RUN, f"{b.where}: only a runnable block can continue another"
        if b.marker == "output":
            assert b.lang == "text", f"{b.where}: an output block is text"


def test_markers_are_only_used_before_fences():
    # a marker away from a fence (a blank line between, a typo) would silently do nothing
    for path in doc_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, ln in enumerate(lines):
            assert not re.match(r"\s+```", ln), f"{path.name}:{i + 1}: an indented fence is not run"
            if re.search(r"<!--\s*(continues|output|not run)", ln):
                assert MARKER.search(ln), f"{path.name}:{i + 1}: malformed marker {ln!r}"
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), (
                    f"{path.name}:{i + 1}: a marker must be the line right before a fence")


def test_output_blocks_attach_to_the_block_before(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\nprint(1)\n```\n<!-- output -->\n```text\n1\n```\n")
    assert [b.marker for b in blocks_of(doc)] == ["", "output"]
    ((b,),) = sessions([doc])
    assert b.expected == "1\n"


def test_the_runner_fails_a_failing_block(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\nraise SystemExit(3)\n```\n<!-- continues -->\n```sh\nfalse\n```\n")
    bl = blocks_of(doc)
    assert [(b.lang, b.marker) for b in bl] == [("python", ""), ("sh", "continues")]
    for b in bl:
        b.path = ROOT / "x.md"
        assert _run(b, tmp_path, tmp_path, 0).returncode != 0
