"""One source of truth for versions and install commands: pyproject.toml.

The README and the guide must not name framework versions of their own (the tests run
against whatever the `test` extra resolves to), every install command they print must use
extras that exist, and every install command pyproject.toml suggests must be the one the
README prints."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("transformers", "accelerate", "lightning")


def _docs() -> dict:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in files}


def _pyproject_text() -> str:
    return (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _extras() -> dict:
    return tomllib.loads(_pyproject_text())["project"]["optional-dependencies"]


def test_the_frameworks_are_test_extras():
    test = " ".join(_extras()["test"])
    for name in FRAMEWORKS:
        assert re.search(rf"\b{name}\b", test), name


def test_docs_name_no_framework_versions():
    pin = re.compile(rf"\b({'|'.join(FRAMEWORKS)})\b[ \t]*(?:==|>=|<=|~=|v)?[ \t]*(\d+\.\d+)", re.I)
    for name, text in _docs().items():
        found = pin.findall(text)
        assert not found, f"{name} names framework versions {found}: pyproject.toml's test extra decides"


def test_install_commands_use_existing_extras():
    extras = set(_extras())
    seen = 0
    for name, text in _docs().items():
        for cmd in re.findall(r"pip install [^\n`]*", text):
            for group in re.findall(r'\.\[([^\]]*)\]', cmd):
                for extra in group.split(","):
                    assert extra.strip() in extras, f"{name}: {cmd!r} names extra {extra!r}"
                    seen += 1
    assert seen >= 3  # demo, test, docs at least


def test_pyproject_suggests_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    suggested = re.findall(r"#.*?\((pip install [^)]*)\)", _pyproject_text())
    suggested += re.findall(r"#\s*the guide:\s*(.+)", _pyproject_text())
    assert suggested, "pyproject.toml suggests no install command: update this test"
    for cmd in suggested:
        assert cmd.strip() in readme, f"pyproject.toml suggests {cmd!r}, the README does not print it"


def test_readme_commands_pin_the_torch_ci_installs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (ci_torch,) = set(re.findall(r"pip install -q (torch==\S+)\n", ci))
    for name, text in _docs().items():
        for pinned in re.findall(r"pip install (torch==\S+)", text):
            assert pinned == ci_torch, f"{name} pins {pinned}, CI installs {ci_torch}"
