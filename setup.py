"""Build the C core. No torch at build time: libtorch's C ABI is found at import.

Environment switches:
  TORCH_SAFETENSORS_WERROR=1    warnings become errors (CI)
  TORCH_SAFETENSORS_SANITIZE=1  ASan + UBSan build (-fsanitize=address,undefined -g -O1)
"""
import os
import sys

from setuptools import Extension, setup

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

setup(
    ext_modules=[
        Extension(
            "torch_safetensors._C",
            sources=[
                "csrc/module.c",
                "csrc/st_engine.c",
                "csrc/st_file.c",
                "csrc/st_aten.c",
                "csrc/st_write.c",
            ],
            depends=["csrc/st_engine.h", "csrc/st_file.h", "csrc/st_aten.h", "csrc/st_write.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            libraries=libraries,
        )
    ],
)
