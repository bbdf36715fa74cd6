"""torch_safetensors: a safe, zero-copy safetensors format for PyTorch.

``import torch_safetensors`` gives a ``safetensors.torch``-compatible API backed by
a C core that parses headers strictly and maps tensors straight from the file.
"""
from ._api import load, load_file, safe_open, save, save_file
from ._core import SafetensorError

__all__ = [
    "SafetensorError",
    "load",
    "load_file",
    "safe_open",
    "save",
    "save_file",
]
__version__ = "0.1.0"
