"""``python -m torch_safetensors``: the command line (inspect, convert, verify, demo).

The commands live in :mod:`torch_safetensors._cli`; ``torch-safetensors`` is the same
program as a console script.
"""
import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m torch_safetensors"))
