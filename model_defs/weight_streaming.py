"""Weight streaming (block swap): a DiT larger than the GPU's room keeps some of its blocks in CPU memory (pinned
when the compute device is a CUDA GPU) and moves each in just before it runs and out right after; the next
streamed block is prefetched on a side CUDA stream while the current one computes. Everything that is not a block
(embeddings, modulation projection, head) and the blocks that fit stay resident on the device.

How it patches the model (it never forks the DiT forward): ``BlockStreamer(dit, plan)`` pins the streamed blocks'
tensors once, at load. ``streamer.resident`` is the part placed on the device (what ComfyUI's memory manager is
given, so it accounts the resident bytes, not the whole model). ``with streamer.streaming():`` (one sampling run of
this DiT) takes each streamed block's tensors out of the module into a storage dict, leaving meta placeholders, and
installs block hooks: the forward pre-hook materializes the block on the compute device (waiting for its prefetch)
and starts the next streamed block's copy; the forward hook puts the placeholders back. Inside the run the
module's own tables hold exactly what is on the device, so on a CPU (where "device" and storage are one torch
device and no copy is made) the residency is still real and measurable (``device_bytes``). The tensors are moved
as they are stored: fp8 weights stay fp8, and whatever a LoRA swapped into a streamed block for the run (merged
weights, parameter deltas) is what moves; unmerged LoRA terms stay on the device (``lora.applied``).

Budget (``plan_streaming``, the one place for its rules): ``gpu_budget_gb`` = 0 keeps everything resident; else
non-block weights + resident blocks + two streamed blocks in flight (the running one and the prefetched next) must
fit. A budget above what the GPU can hold is cut to ``MAX_WEIGHT_SHARE`` of its memory (one log line); one below
the minimum (non-block weights and two blocks) is an error naming the smallest allowed value.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .bundles import SpacetimeModel

log = logging.getLogger(__name__)

GIB = 2**30  # the budget's "GB": 1024^3 bytes, as ComfyUI counts VRAM
IN_FLIGHT = 2  # streamed blocks on the device at once: the running one and the prefetched next
# Of a GPU's memory, at most this share goes to weights; the rest is for activations, the CUDA context and the
# host's reserve. A larger budget is cut to it.
MAX_WEIGHT_SHARE = 0.9


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _entries(module: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """(table, name, tensor) of every parameter and buffer of ``module`` and its submodules."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    yield table, name, tensor


def module_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(tensor) for _, _, tensor in _entries(module))


def device_bytes(dit: nn.Module, device: torch.device | str, streamer: "BlockStreamer | None" = None) -> int:
    """Bytes of the distinct tensors of ``dit`` on ``device`` now: those in its own tables and, during a streaming
    run, the streamed blocks moved in but not yet placed (prefetched). What the budget is kept by."""
    device = torch.device(device)
    tensors = [t for _, _, t in _entries(dit)] + ([] if streamer is None else streamer.moved_in())
    distinct = {(t.data_ptr(), t.dtype, tuple(t.shape)): tensor_bytes(t) for t in tensors if t.device.type == device.type}
    return sum(distinct.values())


def check_budget(gpu_budget_gb) -> float:
    """The budget as a float; one-line ValueError naming the input when it is not a finite number >= 0."""
    if isinstance(gpu_budget_gb, bool) or not isinstance(gpu_budget_gb, (int, float)) or not math.isfinite(gpu_budget_gb) or gpu_budget_gb < 0:
        raise ValueError(f"gpu_budget_gb={gpu_budget_gb!r} is not allowed: it must be a finite number >= 0 (0: the whole model on the GPU)")
    return float(gpu_budget_gb)


@dataclass(frozen=True)
class StreamingPlan:
    """Which blocks live in CPU memory (``streamed``, block indices) and the bytes the device holds for the DiT:
    ``resident`` (non-block weights and resident blocks) plus ``in_flight`` (streamed blocks moved in at once)."""

    streamed: tuple[int, ...]
    resident: int
    in_flight: int

    @property
    def device_bytes(self) -> int:
        return self.resident + self.in_flight


def spread(num_blocks: int, count: int) -> tuple[int, ...]:
    """``count`` block indices spread evenly over ``num_blocks``: resident blocks between two streamed ones give
    each prefetch time to finish."""
    return tuple(sorted({min(num_blocks - 1, int((j + 0.5) * num_blocks / count)) for j in range(count)}))


def plan_for_blocks(dit: nn.Module, resident_blocks: int) -> StreamingPlan:
    """The plan that keeps ``resident_blocks`` blocks (0..num_blocks) resident and streams the others."""
    num_blocks = len(dit.blocks)
    if not 0 <= resident_blocks <= num_blocks:
        raise ValueError(f"resident_blocks={resident_blocks} is not allowed; allowed: 0 to {num_blocks}")
    streamed = spread(num_blocks, num_blocks - resident_blocks) if resident_blocks < num_blocks else ()
    block_sizes = [module_bytes(block) for block in dit.blocks]
    resident = module_bytes(dit) - sum(block_sizes[i] for i in streamed)
    in_flight = sum(sorted((block_sizes[i] for i in streamed), reverse=True)[:IN_FLIGHT])
    return StreamingPlan(streamed, resident, in_flight)


def plan_streaming(dit: nn.Module, gpu_budget_gb: float, device: torch.device, name: str = "the model") -> StreamingPlan | None:
    """The plan for a budget of ``gpu_budget_gb`` (GiB) of DiT weights on ``device``: as many resident blocks as
    fit beside the non-block weights and the two in-flight streamed blocks; None when everything fits (or 0:
    off). A budget above ``MAX_WEIGHT_SHARE`` of a CUDA GPU's memory is cut to it (one log line); one too small
    for even a fully streamed model is a ValueError naming the input and the smallest allowed value."""
    budget = check_budget(gpu_budget_gb) * GIB
    if budget == 0:
        return None
    if device.type == "cuda":
        room = int(torch.cuda.get_device_properties(device).total_memory * MAX_WEIGHT_SHARE)
        if budget > room:
            log.info("Spacetime: gpu_budget_gb=%g is more than %s can hold for weights; using %.2f GB (%d%% of its memory)",
                     gpu_budget_gb, torch.cuda.get_device_name(device), room / GIB, round(100 * MAX_WEIGHT_SHARE))
            budget = room
    if module_bytes(dit) <= budget:
        return None
    smallest = plan_for_blocks(dit, 0)
    if smallest.device_bytes > budget:
        need = math.ceil(smallest.device_bytes / GIB * 100) / 100
        raise ValueError(
            f"gpu_budget_gb={gpu_budget_gb:g} is too small for {name}: its non-block weights and {IN_FLIGHT} streamed blocks "
            f"need {need:.2f} GB; allowed: 0 (off) or at least {need:.2f}"
        )
    plan = smallest
    for keep in range(1, len(dit.blocks)):
        candidate = plan_for_blocks(dit, keep)
        if candidate.device_bytes > budget:
            break
        plan = candidate
    return plan


class ResidentWeights(nn.Module):
    """The part of a streamed DiT that lives on the device: its non-block modules and resident blocks (the same
    module objects, registered here too). Placing it (``.to(device)``, ComfyUI's ModelPatcher) moves exactly
    those; ``device_working_bytes`` is what the streamed blocks in flight take beside it."""

    def __init__(self, dit: nn.Module, streamed: tuple[int, ...], working_bytes: int):
        super().__init__()
        if any(t is not None for t in (*dit._parameters.values(), *dit._buffers.values())):
            raise ValueError(f"{type(dit).__name__} holds tensors of its own outside its submodules; weight streaming places submodules only")
        for name, child in dit.named_children():
            if name != "blocks":
                self.add_module(name, child)
        self.resident_blocks = nn.ModuleList(block for index, block in enumerate(dit.blocks) if index not in streamed)
        self.device_working_bytes = working_bytes


def _pinned_bytes(count: int) -> torch.Tensor:
    return torch.empty(count, dtype=torch.uint8, pin_memory=True)


class PinnedArena:
    """Page-locked CPU memory for many tensors, handed out from a few large buffers. PyTorch's pinned allocator
    rounds every allocation up to a power of two (a 14B fp8 FFN weight of 71 MB takes 128 MB), which would cost a
    streamed 14B model ~1.5x its size in locked RAM; buffers of ``CHUNK`` bytes (a power of two: nothing rounded)
    lose only what is left at the end of each, and the last one is the smallest power of two that holds the rest.
    ``total_bytes``: what will be stored (``padded`` sizes); ``allocate(n)``: n bytes of pinned memory (tests: plain)."""

    CHUNK = GIB
    ALIGN = 512  # every tensor starts on a 512-byte boundary (any dtype's alignment; fast DMA)

    def __init__(self, total_bytes: int, allocate=_pinned_bytes):
        self._allocate = allocate
        self._left = total_bytes
        self._buffer: torch.Tensor | None = None
        self._used = 0
        self.allocated = 0  # bytes of pinned memory taken

    @classmethod
    def padded(cls, tensor: torch.Tensor) -> int:
        return -(-tensor_bytes(tensor) // cls.ALIGN) * cls.ALIGN

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``tensor`` (same dtype and shape) in pinned memory."""
        size, padded = tensor_bytes(tensor), self.padded(tensor)
        if padded > self.CHUNK:  # larger than a buffer: one of its own
            buffer, offset = self._take(padded), 0
        else:
            if self._buffer is None or self._used + padded > self._buffer.numel():
                want = max(padded, min(self._left, self.CHUNK))
                self._buffer, self._used = self._take(min(self.CHUNK, 1 << (want - 1).bit_length())), 0
            buffer, offset = self._buffer, self._used
            self._used += padded
        self._left -= padded
        return buffer[offset:offset + size].view(tensor.dtype).view(tensor.shape).copy_(tensor)

    def _take(self, count: int) -> torch.Tensor:
        self.allocated += count
        return self._allocate(count)


class BlockStreamer:
    """Streams the blocks ``plan.streamed`` of ``dit`` during ``streaming()``; ``pin``: keep their CPU tensors in
    page-locked memory (``PinnedArena``; only useful, and only done, when the compute device is a CUDA GPU).
    ``allocate``: the arena's allocator (tests)."""

    def __init__(self, dit: nn.Module, plan: StreamingPlan, pin: bool, allocate=_pinned_bytes):
        self.dit = dit
        self.plan = plan
        self._run: _Run | None = None
        total = sum(PinnedArena.padded(t) for index in plan.streamed for _, _, t in _entries(dit.blocks[index]))
        self.arena = PinnedArena(total, allocate) if pin else None
        with torch.no_grad():
            for index in plan.streamed:
                for table, name, tensor in list(_entries(dit.blocks[index])):
                    stored = tensor.to("cpu") if self.arena is None else self.arena.store(tensor)
                    table[name] = nn.Parameter(stored, requires_grad=False) if isinstance(tensor, nn.Parameter) else stored
        self.resident = ResidentWeights(dit, plan.streamed, plan.in_flight)

    def describe(self) -> str:
        blocks = len(self.dit.blocks)
        return (f"{blocks - len(self.plan.streamed)} of {blocks} blocks resident, {len(self.plan.streamed)} streamed from CPU "
                f"memory; {self.plan.device_bytes / GIB:.2f} GB of weights on the device")

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """One sampling run: the streamed blocks move in and out around their forward, onto the device the resident
        weights are on. On exit (also on an error) every block holds its own tensors again."""
        if self._run is not None:
            raise RuntimeError("this DiT is already streaming: one sampling run at a time per loaded model")
        device = next(self.resident.parameters()).device
        self._run = _Run(self.dit, self.plan.streamed, device)
        try:
            self._run.start()
            yield
        finally:
            self._run.stop()
            self._run = None

    def moved_in(self) -> list[torch.Tensor]:
        """The streamed blocks' tensors on the device now, placed in their block or still in flight (prefetched):
        with the module's own tables, what the budget counts (empty outside a run)."""
        return [] if self._run is None else [t for tensors, _ in self._run.moved_in.values() for t in tensors]


class _Run:
    """The state of one streaming run: each streamed block's stored tensors and placeholders, blocks moved in
    (with the CUDA event their copy recorded), and the hooks."""

    def __init__(self, dit: nn.Module, streamed: tuple[int, ...], device: torch.device):
        self.blocks = dit.blocks
        self.streamed = streamed
        self.device = device
        order = list(streamed)
        # the next streamed block after each block, round the end (the first one is prefetched for the next call)
        self.next_of = {i: next((j for j in order if j > i), order[0] if order else i) for i in range(len(self.blocks))}
        self.stored: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}
        self.moved_in: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.handles: list = []
        cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if cuda else None
        self.side = torch.cuda.Stream(device) if cuda else None

    def start(self) -> None:
        for index in self.streamed:
            entries = list(_entries(self.blocks[index]))
            self.stored[index] = entries
            self._place(index, [_placeholder(t) for _, _, t in entries])
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._before(index)))
            if index in self.stored:
                self.handles.append(block.register_forward_hook(self._after(index)))

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.side is not None:
            self.compute.wait_stream(self.side)  # no copy still writing into memory about to be freed
        self.moved_in.clear()
        for index, entries in self.stored.items():
            for table, name, tensor in entries:
                table[name] = tensor

    def _place(self, index: int, tensors: list[torch.Tensor]) -> None:
        for (table, name, original), tensor in zip(self.stored[index], tensors):
            table[name] = nn.Parameter(tensor, requires_grad=False) if isinstance(original, nn.Parameter) else tensor

    def _move_in(self, index: int) -> None:
        """Start copying block ``index`` to the device (on the side stream on CUDA); nothing if it is already in."""
        if index in self.moved_in:
            return
        entries = self.stored[index]
        if self.side is None:  # same path without streams: a no-op move on the CPU
            self.moved_in[index] = ([t.to(self.device) for _, _, t in entries], None)
            return
        # Allocated on the compute stream, so the memory of blocks moved out before is reused in stream order (the
        # device never holds more than the plan's blocks); the side stream copies once the compute stream has
        # finished with that memory, and the compute stream waits for the copy (``_before``) before it reads it.
        tensors = [torch.empty_like(t, device=self.device) for _, _, t in entries]
        self.side.wait_stream(self.compute)
        with torch.cuda.stream(self.side):
            for tensor, (_, _, stored) in zip(tensors, entries):
                tensor.copy_(stored, non_blocking=True)  # from pinned memory: asynchronous
            done = torch.cuda.Event()
            done.record(self.side)
        self.moved_in[index] = (tensors, done)

    def _before(self, index: int):
        def hook(module, args):
            if index in self.stored:
                self._move_in(index)
                tensors, done = self.moved_in[index]
                if done is not None:
                    self.compute.wait_event(done)
                self._place(index, tensors)
            following = self.next_of[index]
            if following != index:
                self._move_in(following)
            return None

        return hook

    def _after(self, index: int):
        def hook(module, args, output):
            self._place(index, [_placeholder(t) for _, _, t in self.stored[index]])
            del self.moved_in[index]  # its memory goes back to the compute stream, reused in stream order
            return None

        return hook


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def stream_weights(model: "SpacetimeModel", gpu_budget_gb: float, device: torch.device) -> "SpacetimeModel":
    """``model`` with its DiT (each expert of a pair: its own streamer) streamed to fit ``gpu_budget_gb`` GiB of
    weights on ``device``; the model itself when everything fits or the budget is 0."""
    import dataclasses

    check_budget(gpu_budget_gb)
    if model.streamer is not None:
        raise ValueError(f"model {model.name} is already streamed; set gpu_budget_gb once, on its loader")
    low_noise = None if model.low_noise is None else stream_weights(model.low_noise, gpu_budget_gb, device)
    plan = plan_streaming(model.dit, gpu_budget_gb, device, model.name)
    streamer = None if plan is None else BlockStreamer(model.dit, plan, pin=device.type == "cuda")
    if streamer is not None:
        log.info("Spacetime: %s: %s", model.name, streamer.describe())
    return dataclasses.replace(model, streamer=streamer, low_noise=low_noise)
