"""Build the C core. No torch at build time: libtorch's C ABI is found at import.

Environment switches:
  TORCH_SAFETENSORS_WERROR=1    warnings become errors (CI)
  TORCH_SAFETENSORS_SANITIZE=1  ASan + UBSan build (-fsanitize=address,undefined -g -O1)
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

WARNINGS = [
    "-Wall",
    "-Wextra",
    "-Wconversion",
    "-Wshadow",
    "-Wstrict-prototypes",
    "-Wmissing-prototypes",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


compile_args = ["-std=c11", "-fvisibility=hidden", *WARNINGS]
link_args = []
libraries = ["dl"] if sys.platform.startswith("linux") else []
if _flag("TORCH_SAFETENSORS_WERROR"):
    compile_args.append("-Werror")
if _flag("TORCH_SAFETENSORS_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    compile_args += san + ["-fno-sanitize-recover=undefined"]
    link_args += ["-fsanitize=address,undefined"]
else:
    compile_args.append("-O2")

# The startup hook: site runs this line in every process. Unset, it costs one
# environment lookup; set, it arms _torch_safetensors_startup (stdlib only), which
# imports torch_safetensors right after the program imports torch.
STARTUP_PTH = "torch_safetensors_startup.pth"
STARTUP_LINE = (
    'import os; os.environ.get("TORCH_SAFETENSORS_FORMAT") and '
    '__import__("_torch_safetensors_startup").install()\n'
)


class build_py_with_startup(build_py):
    """Puts the startup .pth at the root of the wheel, so it lands in site-packages."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, STARTUP_PTH)
        os.makedirs(self.build_lib, exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(STARTUP_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, STARTUP_PTH)]


class _StrategyWithStartup:
    """An editable-install strategy that also writes the startup .pth into the wheel."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, wheel, files, mapping):
        result = self.inner(wheel, files, mapping)
        wheel.writestr(STARTUP_PTH, STARTUP_LINE.encode("utf-8"))
        return result

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


class editable_wheel_with_startup(editable_wheel):
    """pip install -e: the editable wheel holds no build_py output, so add the .pth."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithStartup(super()._select_strategy(*args, **kwargs))


setup(
    cmdclass={"build_py": build_py_with_startup, "editable_wheel": editable_wheel_with_startup},
    ext_modules=[
        Extension(
            "torch_safetensors._C",
            sources=[
                "csrc/module.c",
                "csrc/st_engine.c",
                "csrc/st_file.c",
                "csrc/st_aten.c",
                "csrc/st_pickle.c",
                "csrc/legacy_module.c",
                "csrc/st_hash.c",
                "csrc/st_write.c",
                "csrc/st_binding.c",
            ],
            depends=["csrc/st_engine.h", "csrc/st_file.h", "csrc/st_aten.h", "csrc/st_pickle.h",
                     "csrc/legacy_module.h", "csrc/st_hash.h", "csrc/st_write.h",
                     "csrc/st_binding.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            libraries=libraries,
        )
    ],
)
