"""How tensors travel between the host and its workers: weights as one shared-memory buffer (one file descriptor
whatever the tensor count, read by every worker without a copy on CPU), and requests / results moved between devices
whatever structure holds them (tuples, lists, dicts, dataclasses such as a ``Pack``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes: every tensor starts on a cache line of the buffer


@dataclass(frozen=True, eq=False)
class FlatTensors:
    """Named tensors in one uint8 buffer: ``layout`` holds (name, dtype, shape, byte offset) per tensor."""

    buffer: torch.Tensor
    layout: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]

    @classmethod
    def pack(cls, tensors: dict[str, torch.Tensor]) -> "FlatTensors":
        """A shared-memory copy of ``tensors`` (any device, any dtype)."""
        layout, offset = [], 0
        for name, tensor in tensors.items():
            layout.append((name, tensor.dtype, tuple(tensor.shape), offset))
            offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        buffer = torch.empty(max(offset, 1), dtype=torch.uint8).share_memory_()
        for (name, dtype, shape, start), tensor in zip(layout, tensors.values()):
            size = tensor.numel() * tensor.element_size()
            if size:
                buffer[start:start + size].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu())
        return cls(buffer, tuple(layout))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Views into the buffer, one per name (no copy)."""
        out = {}
        for name, dtype, shape, start in self.layout:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out[name] = self.buffer[start:start + size].view(dtype).view(shape)
        return out

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def to_device(value, device: torch.device, copy: bool = False):
    """``value`` with every tensor inside it on ``device`` (the same objects where nothing moves, unless ``copy``:
    what is sent to the workers is a copy, so sharing it never touches the sampler's own tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=copy)
    if isinstance(value, tuple):
        return tuple(to_device(v, device, copy) for v in value)
    if isinstance(value, list):
        return [to_device(v, device, copy) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device, copy) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_device(getattr(value, f.name), device, copy) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value
