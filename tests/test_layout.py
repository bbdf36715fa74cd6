"""The layout stays followable: no import cycle in the Python package, no call cycle
between the C files, and docs/architecture.md lists every module that exists (and none
that does not)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "torch_safetensors"
CSRC = ROOT / "csrc"
PACKAGE = "torch_safetensors"

# Known cycles, each to be deleted by the change that removes it: the test fails both on a
# cycle not listed here and on an entry that no longer matches a cycle.
KNOWN_CYCLES: set = set()  # none: a cycle found later fails test_no_import_cycles
EXTENSIONS = {"_C"}  # compiled modules: they import nothing from the package


# ---- Python imports ----


def _modules() -> dict[str, Path]:
    """Module name (relative to the package, '__init__' for the package) -> file."""
    return {p.stem: p for p in sorted(PKG.glob("*.py"))}


def _targets(node: ast.AST, modules: set[str]) -> list[str]:
    """The package's modules that one import statement imports (any nesting level)."""
    out = []
    if isinstance(node, ast.ImportFrom):
        if node.level == 0 and node.module and (node.module == PACKAGE or
                                                node.module.startswith(PACKAGE + ".")):
            base = node.module[len(PACKAGE) + 1:] if node.module != PACKAGE else ""
        elif node.level == 1:
            base = node.module or ""
        elif node.level > 1:
            raise AssertionError(f"an import from above the package: line {node.lineno}")
        else:
            return out
        if base:
            out.append(base.split(".")[0])
        else:
            # from . import a, b: submodules, or names the package __init__ defines
            for alias in node.names:
                if alias.name not in EXTENSIONS:
                    out.append(alias.name if alias.name in modules else "__init__")
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith(PACKAGE + "."):
                out.append(alias.name.split(".")[1])
    return [t for t in out if t in modules]


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    files = files if files is not None else _modules()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):  # module level and inside functions alike
            for target in _targets(node, set(files)):
                if target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.add(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_no_import_cycles_in_the_package():
    found = set(cycles(import_graph()))
    new = found - KNOWN_CYCLES
    assert not new, f"import cycles: {[sorted(c) for c in new]}; imports must point down the layers"


def test_known_cycles_still_exist():
    # when a known cycle is removed, its allowlist entry goes too
    stale = KNOWN_CYCLES - set(cycles(import_graph()))
    assert not stale, f"no longer a cycle, delete from KNOWN_CYCLES: {[sorted(c) for c in stale]}"


def test_the_cycle_finder_sees_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import x\n")
    (tmp_path / "c.py").write_text("import torch_safetensors.a\n")
    (tmp_path / "d.py").write_text("from . import a\n")
    graph = import_graph({p.stem: p for p in tmp_path.glob("*.py")})
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


# ---- C: includes are calls ----


def _c_files() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def _prototypes(header: Path) -> list[str]:
    text = re.sub(r"/\*.*?\*/", "", header.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"^#.*$", "", text, flags=re.M)
    protos = re.findall(r"(?:^|;|\})\s*(?!typedef)[A-Za-z_][\w \t\*]*?\b(\w+)\s*\(([^;{}()]|\([^()]*\))*\)\s*;",
                        text, flags=re.M)
    return [name for name, _ in protos]


def test_each_header_declares_only_its_own_files_functions():
    # so that including X.h means calling into X.c, and the include graph is the call graph
    sources = {p.name: p.read_text(encoding="utf-8") for p in _c_files()}
    checked = 0
    for header in sorted(CSRC.glob("*.h")):
        own = header.with_suffix(".c").name
        assert own in sources, f"{header.name} has no {own}"
        for name in _prototypes(header):
            definers = [f for f, text in sources.items()
                        if re.search(rf"^[A-Za-z_][\w \t\*]*\b{name}\s*\([^;]*?\)\s*\{{", text, re.M)]
            assert definers == [own], f"{header.name} declares {name}, defined in {definers}"
            checked += 1
    assert checked > 40


def c_call_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src in _c_files():
        includes = re.findall(r'^#include "(\w+)\.h"', src.read_text(encoding="utf-8"), re.M)
        graph[src.stem] = {h for h in includes if h != src.stem and (CSRC / f"{h}.c").exists()}
    for header in CSRC.glob("*.h"):  # a header's own includes are its file's calls too
        includes = re.findall(r'^#include "(\w+)\.h"', header.read_text(encoding="utf-8"), re.M)
        graph.setdefault(header.stem, set()).update(h for h in includes if h != header.stem)
    return graph


def test_no_call_cycles_between_c_files():
    graph = c_call_graph()
    assert "st_binding" in graph["st_write"] and "st_binding" in graph["legacy_module"]
    assert "module" not in set().union(*graph.values()), "nothing calls back into module.c"
    assert cycles(graph) == []


# ---- the architecture page lists the modules ----


def _listed() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## The modules", 1)[1]
    return set(re.findall(r"`([\w.]+\.(?:py|c|h))`", section))


def _existing() -> set[str]:
    names = {p.name for p in PKG.glob("*.py")}
    names |= {p.name for p in CSRC.glob("*.c")}
    names |= {p.name for p in CSRC.glob("*.h")}
    names |= {p.name for p in ROOT.glob("_*.py")}  # the startup hook
    return names


def test_architecture_lists_every_module():
    missing = _existing() - _listed()
    assert not missing, f"docs/architecture.md does not list {sorted(missing)}"


def test_architecture_lists_no_module_that_is_gone():
    gone = _listed() - _existing()
    assert not gone, f"docs/architecture.md lists {sorted(gone)}, which do not exist"


@pytest.mark.parametrize("name", ["_torch.py", "st_binding.c", "legacy_module.h", "_torch_safetensors_startup.py"])
def test_the_module_list_is_read(name):
    assert name in _listed() and name in _existing()
