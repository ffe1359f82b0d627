"""SharedModelWeights: one copy of a model's weights, used by several processes.

The owner loads the weights once and wraps the module (or its state dict); `handle` goes to the other process,
which calls `SharedModelWeights.load(handle, module_factory)`: the factory builds the module on the meta device
(no memory), then every parameter and buffer is bound to the imported tensor of the same name. The importer
allocates no weight memory at all. Generic on purpose: any nn.Module, no knowledge of the model code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from semipd_memory.sharing import SharedTensorsHandle, export_tensors, import_tensors, release_export

ModuleT = TypeVar("ModuleT", bound=nn.Module)  # the factory's module type comes back out


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of `module` by name, tied ones under each of their names, non-persistent
    buffers included (the importer builds its module on meta and needs them all)."""
    out = {n: p.detach() for n, p in module.named_parameters(remove_duplicate=False)}
    out.update((n, b.detach()) for n, b in module.named_buffers(remove_duplicate=False) if b is not None)
    return out


def bind_tensors(
    module_factory: Callable[[], ModuleT], tensors: Mapping[str, Tensor], *, strict: bool = True
) -> ModuleT:
    """Build `module_factory()` on the meta device and make its parameters/buffers BE `tensors` (no copy).

    Names missing from `tensors` raise ValueError (they would stay on meta); with strict=True, names in `tensors`
    that the module lacks raise too. Shapes must match; dtypes follow the tensors. Tensors that are the same view
    of the same memory (tied weights) become one shared Parameter, as in the owner.
    """
    if not callable(module_factory):
        raise TypeError(f"module_factory must be callable, got {type(module_factory).__name__}")
    with torch.device("meta"):
        module = module_factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_factory must return an nn.Module, got {type(module).__name__}")
    params: dict[tuple, nn.Parameter] = {}  # one Parameter per distinct view: keeps ties tied
    used: set[str] = set()
    missing: list[str] = []
    for name, old in list(module.named_parameters(remove_duplicate=False)):
        if name not in tensors:
            missing.append(name)
            continue
        t = _checked(name, old, tensors[name])
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in params:
            params[key] = nn.Parameter(t, requires_grad=False)
        owner, leaf = _split(module, name)
        owner._parameters[leaf] = params[key]
        used.add(name)
    for name, old_buf in list(module.named_buffers(remove_duplicate=False)):
        if name not in tensors:
            missing.append(name)
            continue
        owner, leaf = _split(module, name)
        owner._buffers[leaf] = _checked(name, old_buf, tensors[name])
        used.add(name)
    if missing:
        raise ValueError(f"shared tensors lack {len(missing)} of the module's names: {', '.join(missing[:8])}")
    extra = [n for n in tensors if n not in used]
    if strict and extra:
        raise ValueError(f"shared tensors have {len(extra)} names the module lacks: {', '.join(extra[:8])}")
    return module.eval()


def _split(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return module.get_submodule(owner), leaf


def _checked(name: str, old: Tensor, new: Tensor) -> Tensor:
    if tuple(old.shape) != tuple(new.shape):
        raise ValueError(f"{name}: module expects shape {tuple(old.shape)}, shared tensor has {tuple(new.shape)}")
    return new


class SharedModelWeights:
    """Owner side: keeps the weights exported; `handle` is plain data for the importer."""

    def __init__(self, source: nn.Module | Mapping[str, Tensor]) -> None:
        if isinstance(source, nn.Module):
            tensors = module_tensors(source)
        elif isinstance(source, Mapping):
            tensors = {n: t.detach() for n, t in source.items()}
        else:
            raise TypeError(f"source must be an nn.Module or a state dict, got {type(source).__name__}")
        self.tensors = tensors
        self.handle: SharedTensorsHandle = export_tensors(tensors)
        self._closed = False

    @property
    def nbytes(self) -> int:
        """Bytes of weight memory (each shared storage counted once)."""
        return self.handle.nbytes

    @staticmethod
    def load(
        handle: SharedTensorsHandle, module_factory: Callable[[], ModuleT], *, strict: bool = True
    ) -> ModuleT:
        """Importer side: the module from `module_factory`, its weights mapped from the owner (zero copies)."""
        return bind_tensors(module_factory, import_tensors(handle), strict=strict)

    def close(self) -> None:
        """Stop keeping the exported weights alive (call once every importer is gone)."""
        if not self._closed:
            release_export(self.handle)
            self._closed = True
