"""torch.compile for the Wan DiT, block by block ("regional compilation", PyTorch's recipe for models made of
repeated layers): each block's ``forward`` goes through one ``torch.compile``; the blocks share their code, so
Dynamo traces one graph and reuses it for every block (a new latent size recompiles once, with dynamic shapes).
Only ``forward`` is compiled, not the module call: block hooks (weight streaming's moves) run eagerly around it,
and tensors swapped into a block between calls (streamed weights, LoRA deltas) are graph inputs, not constants.
Hooks on layers inside a block (unmerged LoRA terms) are traced into the graph; Dynamo does not guard on such hooks
by default (``skip_nnmodule_hook_guards``: a graph traced without them would be reused when a LoRA adds some, and
silently ignore it), so the compiled calls run with those guards on: a block with LoRA hooks gets its own graph,
traced once and reused across runs and LoRAs of the same ranks. The embeddings and the head run eagerly (a few
small layers, once per step).

If compiling fails (no C++ compiler for inductor, an unsupported Python, an op Dynamo cannot trace), the DiT runs
eagerly from then on with one log line: a compiled call that raises is run again eagerly, and when that works the
compiler was at fault; when it raises too, that error is the caller's.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("off", "on")


class _Fallback:
    """Shared by the blocks of one DiT: set once a compiled call failed, so every block then runs eagerly."""

    def __init__(self, name: str):
        self.name = name
        self.eager = False

    def give_up(self, error: BaseException) -> None:
        if not self.eager:
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            log.warning("Spacetime: torch.compile does not work here for %s (%s: %s); running it without compiling",
                        self.name, type(error).__name__, reason)
        self.eager = True


def _hook_guards() -> Callable[[], contextlib.AbstractContextManager]:
    """A context that makes Dynamo guard on module hooks while it compiles and runs (a no-op without Dynamo)."""
    try:
        import torch._dynamo

        torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)  # the option exists in this version
        return lambda: torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)
    except Exception:  # no Dynamo here: compiling fails anyway and falls back
        return contextlib.nullcontext


def _guarded(compiled: Callable, eager: Callable, fallback: _Fallback, guards) -> Callable:
    def forward(*args, **kwargs):
        if fallback.eager:
            return eager(*args, **kwargs)
        try:
            with guards():
                return compiled(*args, **kwargs)
        except Exception as error:  # the compiler's failure, unless the eager forward fails as well
            result = eager(*args, **kwargs)
            fallback.give_up(error)
            return result

    forward.spacetime_compiled = True
    return forward


def compile_blocks(dit: nn.Module, name: str = "the model", compiler: Callable[[Callable], Callable] | None = None) -> nn.Module:
    """Compile each block's forward of ``dit`` in place (once: a compiled DiT is left as it is) and return it.
    ``compiler``: ``torch.compile`` (inductor, dynamic shapes when a size changes) unless given (tests)."""
    compiler = compiler or torch.compile
    fallback, guards = _Fallback(name), _hook_guards()
    for block in dit.blocks:
        if getattr(block.forward, "spacetime_compiled", False):
            continue
        eager = block.forward  # the class's forward, bound to this block
        try:
            compiled = compiler(eager)
        except Exception as error:  # torch.compile itself refused (e.g. a Python version Dynamo does not support)
            fallback.give_up(error)
            compiled = eager
        block.forward = _guarded(compiled, eager, fallback, guards)
    return dit


def check_compile(compile: str) -> None:
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile={compile!r} is not allowed; allowed values: {list(COMPILE_CHOICES)}")
