"""torch_safetensors' startup hook: TORCH_SAFETENSORS_FORMAT for code that never imports it.

The installed ``torch_safetensors_startup.pth`` runs one line in every Python process
at startup: it reads one environment variable and stops there when
``TORCH_SAFETENSORS_FORMAT`` is unset. When it is set, it imports this module (the
standard library only), which puts a finder in front of ``sys.meta_path``. The finder
waits for ``import torch``; once torch's own module has run, it imports
``torch_safetensors``, which wraps ``torch.save``/``torch.load`` and reads the variable.
Nothing heavy is imported before the program imports torch, and nothing at all if it
never does. Launchers (torchrun, multiprocessing) start workers with the same
environment, so every worker gets the same switch.
"""
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds at startup: annotations only
    from typing import Any, Optional, Sequence

ENV_FORMAT = "TORCH_SAFETENSORS_FORMAT"


def _activate() -> None:
    """Imports torch_safetensors now that torch is imported (its import installs the
    wrappers and reads the environment)."""
    if "torch_safetensors" in sys.modules:
        return  # being imported (it imported torch): its own import installs them
    try:
        import torch_safetensors  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{ENV_FORMAT} is set, but torch_safetensors cannot be imported ({e}); "
            f"unset {ENV_FORMAT} or repair the installation"
        ) from e


class TorchImportHook:
    """A meta-path finder that runs :func:`_activate` right after torch is imported.

    It finds nothing itself: for ``torch`` it asks the finders behind it, and hooks the
    ``exec_module`` of the loader they return (on that loader instance only, so the
    module keeps its real ``__loader__``). It removes itself once torch's module runs,
    not before: libraries probe with ``importlib.util.find_spec("torch")`` (transformers
    does) and import it later through a fresh spec.
    """

    def find_spec(self, fullname: str, path: "Optional[Sequence[str]]" = None, target: "Any" = None) -> "Any":
        if fullname != "torch":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        def exec_module(module: "Any") -> None:
            uninstall()
            try:
                real_exec(module)
            finally:
                try:
                    del loader.exec_module
                except AttributeError:
                    pass
            _activate()

        try:
            loader.exec_module = exec_module
        except AttributeError:
            return spec  # a loader that takes no attributes: nothing to hook
        return spec


_HOOK = TorchImportHook()


def install() -> None:
    """Arms the hook (or imports torch_safetensors now if torch is already imported)."""
    if "torch" in sys.modules:
        _activate()
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    """Disarms the hook."""
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
