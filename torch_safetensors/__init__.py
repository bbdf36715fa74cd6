"""torch_safetensors: a safe, zero-copy safetensors format for PyTorch.

``import torch_safetensors`` gives ``torch.save(obj, f, format="safetensors")`` and a
``torch.load`` that recognises safetensors by content and loads legacy pickle
checkpoints only through the weights_only unpickler. It also offers a
``safetensors.torch``-compatible API backed by a C core that parses headers strictly
and maps tensors straight from the file.
"""
from ._api import load, load_file, safe_open, save, save_file
from ._async import async_save, release_async_buffers
from ._core import SafetensorError
from ._sharded import load_sharded, save_sharded
from ._torch import install, installed, uninstall

__all__ = [
    "SafetensorError",
    "async_save",
    "install",
    "installed",
    "load",
    "load_file",
    "load_sharded",
    "release_async_buffers",
    "safe_open",
    "save",
    "save_file",
    "save_sharded",
    "uninstall",
]
__version__ = "0.1.0"

install()
