"""What the startup hook (torch_safetensors_startup.pth) costs every Python process.

Run:  python benchmarks/bench_startup_hook.py [--n 20000]

Measures, in this process, what site does with each .pth line at startup (compile and
exec the line), with TORCH_SAFETENSORS_FORMAT unset: our line against setuptools'
distutils-precedence.pth line (present in every virtualenv with setuptools) and a bare
``import os`` line. Then, with the variable set, the import of the stdlib-only hook
module and the cost the armed finder adds to each import before torch's. Best of 5.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import pathlib
import py_compile
import sys
import timeit

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUPTOOLS_LINE = (
    "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') == 'local'; "
    "enabled and __import__('_distutils_hack').add_shim(); \n"
)


def startup_line() -> str:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "STARTUP_LINE":
            return ast.literal_eval(node.value)
    raise SystemExit("setup.py defines no STARTUP_LINE")


def per_call_us(fn, n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n
    os.environ.pop("TORCH_SAFETENSORS_FORMAT", None)
    ours = startup_line()
    rows = [
        ("our .pth line, variable unset", per_call_us(lambda: exec(ours, {}), n)),
        ("setuptools distutils-precedence.pth line", per_call_us(lambda: exec(SETUPTOOLS_LINE, {}), n)),
        ("a bare 'import os' line", per_call_us(lambda: exec("import os\n", {}), n)),
    ]

    sys.path.insert(0, str(ROOT))
    hook_file = str(ROOT / "_torch_safetensors_startup.py")
    py_compile.compile(hook_file, cfile=importlib.util.cache_from_source(hook_file), doraise=True)

    def import_hook() -> None:
        sys.modules.pop("_torch_safetensors_startup", None)
        importlib.import_module("_torch_safetensors_startup")

    rows.append(("variable set: import the hook module (cached bytecode)", per_call_us(import_hook, max(n // 20, 1))))
    hook = sys.modules["_torch_safetensors_startup"].TorchImportHook()
    rows.append(("variable set: the finder, per import before torch's", per_call_us(lambda: hook.find_spec("json"), n)))
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  microseconds")
    for name, us in rows:
        print(f"{name:<{width}}  {us:8.2f}")


if __name__ == "__main__":
    main()
