"""torch_safetensors: a safe, zero-copy safetensors format for PyTorch.

``import torch_safetensors`` gives ``torch.save(obj, f, format="safetensors")`` and a
``torch.load`` that recognises safetensors by content and loads legacy pickle
checkpoints only through the weights_only unpickler. It also offers the
``safetensors.torch`` API (and ``safetensors``' ``serialize``/``deserialize``) backed by
a C core that parses headers strictly and maps tensors straight from the file.
"""
__version__ = "0.1.0"


def _check_built() -> None:
    """Raises a clear ImportError when the C extension is not built (a source tree)."""
    import importlib.util
    import os

    if importlib.util.find_spec(f"{__name__}._C") is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    source_tree = os.path.exists(os.path.join(root, "setup.py"))
    where = (
        f"this is the source tree at {root}, and Python imported it instead of an installed "
        "copy (Python puts the current directory first on sys.path). Either build it in place: "
        f"cd {root} && pip install -e . (or python setup.py build_ext --inplace); or run "
        "Python from another directory so that the installed package is found"
        if source_tree
        else f"reinstall the package (pip install --force-reinstall torch_safetensors) so that "
        f"torch_safetensors/_C is built into {here}"
    )
    raise ImportError(
        f"torch_safetensors: the C extension torch_safetensors._C is not built: {where}.",
        name=f"{__name__}._C",
    )


_check_built()
del _check_built

from ._api import (  # noqa: E402
    SafetensorError,
    SliceIndexError,
    TensorSpec,
    UnsupportedTensorError,
    _find_shared_tensors,
    _remove_duplicate_names,
    deserialize,
    load,
    load_file,
    load_model,
    safe_open,
    save,
    save_file,
    save_model,
    serialize,
    serialize_file,
    storage_ptr,
    storage_size,
)
from ._async import async_save, release_async_buffers  # noqa: E402
from ._default import PickleFallbackWarning, get_default_format, set_default_format  # noqa: E402
from ._sharded import load_sharded, save_sharded  # noqa: E402
from ._torch import install, installed, uninstall  # noqa: E402

__all__ = [
    "PickleFallbackWarning",
    "SafetensorError",
    "SliceIndexError",
    "TensorSpec",
    "UnsupportedTensorError",
    "__version__",
    "async_save",
    "deserialize",
    "get_default_format",
    "install",
    "installed",
    "load",
    "load_file",
    "load_model",
    "load_sharded",
    "release_async_buffers",
    "safe_open",
    "save",
    "save_file",
    "save_model",
    "save_sharded",
    "serialize",
    "serialize_file",
    "storage_ptr",
    "set_default_format",
    "storage_size",
    "uninstall",
]

install()
