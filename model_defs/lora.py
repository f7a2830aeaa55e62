"""LoRA for the Wan DiT: reading the key formats found on the Hub, binding a file to a DiT's layers, and
applying it for the length of a sampling run only.

Formats (read beside diffusers' ``loaders/lora_conversion_utils.py`` — ``_convert_non_diffusers_wan_lora_to_diffusers``,
``_convert_musubi_wan_lora_to_diffusers`` — and ComfyUI's ``comfy/lora.py`` key map for Wan):
- ComfyUI / kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``: the layer name with its dots as underscores; the term is scaled by ``alpha / rank``.
- diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B`` (``lora_B.bias``: a bias
  delta, PEFT's ``lora_bias``); diffusers' names map to ours through ``wan_keys``; a ``lora_adapter_metadata``
  entry with ``lora_alpha`` scales each term by ``lora_alpha / its rank``, as PEFT does.
- original / musubi: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up`` (or
  ``lora_A``/``lora_B``), with or without the ``diffusion_model.`` prefix.
- full deltas, as distillation LoRAs (lightx2v, CausVid) carry them: ``<layer>.diff`` (weight delta),
  ``<layer>.diff_b`` (bias delta), also of parameters that are not Linear weights (``blocks.N.modulation.diff``,
  ``head.modulation.diff``, norm weights ``blocks.N.norm3.diff``).

A Linear(-like, ``fp8.FP8Linear`` too) layer ``W x + b`` patched by LoRAs i at strengths s_i computes
``W x + b + sum_i s_i (scale_i up_i(down_i(x)) + diff_i x + diff_b_i)``; any other parameter p becomes
``p + sum_i s_i diff_i``. The DiT is shared by every branch of a graph, so these changes exist only inside
``applied(dit, loras)``, which the sampler enters for the DiT of each step; on exit every original tensor object
is back in its place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, read_safetensors
from .fp8 import FP8Linear
from .wan_keys import original_dit_name

log = logging.getLogger(__name__)

LORA_MODES = ("unmerged", "merged")

# Prefixes naming the model a key belongs to, stripped; the flat ones spell the layer with underscores.
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_")
# Key endings -> the term of the layer they hold.
_PARTS = {
    ".lora_down.weight": "down", ".lora_A.weight": "down", ".lora.down.weight": "down",
    ".lora_up.weight": "up", ".lora_B.weight": "up", ".lora.up.weight": "up",
    ".lora_B.bias": "diff_b", ".diff_b": "diff_b", ".diff": "diff", ".alpha": "alpha",
}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: the PEFT config as JSON


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file as read: its tensors and metadata, not yet tied to a model (``bind_lora`` does that)."""

    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


@dataclass(frozen=True, eq=False)
class LinearDelta:
    """What one LoRA adds to one Linear layer: ``scale * up(down(x))`` (down ``[r, in]``, up ``[out, r]``), and the
    full deltas ``diff`` (``[out, in]``) and ``diff_b`` (``[out]``); each term optional."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    def weight_delta(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The whole weight delta ``[out, in]`` fp32 on ``device`` (what merging adds), or None without weight terms."""
        cast = dict(device=device, dtype=torch.float32)
        delta = None if self.down is None else self.scale * (self.up.to(**cast) @ self.down.to(**cast))
        if self.diff is not None:
            delta = self.diff.to(**cast) if delta is None else delta + self.diff.to(**cast)
        return delta


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA bound to a Wan DiT's layers (original Wan names): Linear layer -> its terms, and parameter (not a
    Linear weight) -> its delta."""

    name: str
    linears: dict[str, LinearDelta]
    params: dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class AppliedLora:
    """A LoRA as a model carries it: at ``strength`` (finite), ``mode`` "unmerged" (its terms added to the
    layers' outputs; fp8 weights stay fp8) or "merged" (folded into the weights for the run)."""

    lora: Lora
    strength: float
    mode: str = "unmerged"

    def __post_init__(self):
        if not isinstance(self.strength, (int, float)) or isinstance(self.strength, bool) or not math.isfinite(self.strength):
            raise ValueError(f"strength={self.strength!r} is not allowed: it must be a finite number (e.g. 1.0)")
        if self.mode not in LORA_MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; allowed values: {list(LORA_MODES)}")


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA .safetensors file (pickles refused, as for every model file)."""
    tensors, metadata = read_safetensors(path)
    return LoraFile(Path(path).name, tensors, metadata)


def _split_key(key: str) -> tuple[str, bool, str] | None:
    """``(layer, flat, part)`` of a key: the layer as the file names it (prefix stripped; ``flat``: dots spelt as
    underscores) and the term it holds; None for a key of no known form."""
    suffix = next((suffix for suffix in _PARTS if key.endswith(suffix)), None)
    if suffix is None:
        return None
    layer, part = key[: -len(suffix)], _PARTS[suffix]
    for prefix in _FLAT_PREFIXES:
        if layer.startswith(prefix):
            return layer[len(prefix):], True, part
    for prefix in _DOTTED_PREFIXES:
        if layer.startswith(prefix):
            layer = layer[len(prefix):]
            break
    return layer, False, part


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    """PEFT's ``lora_alpha`` from diffusers' adapter metadata (keys bare or under ``transformer.``), or None: each
    layer's term is then scaled by ``lora_alpha / its rank``, as PEFT does."""
    try:
        config = json.loads(metadata.get(PEFT_METADATA_KEY) or "{}")
        alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
        return None if alpha is None else float(alpha)
    except (ValueError, TypeError, AttributeError):
        return None


def _resolve(layer: str, flat: bool, names: set[str], flat_names: dict[str, str]) -> str | None:
    """Our name of a layer the file names: original names as they are, diffusers' through ``wan_keys``."""
    if flat:
        return flat_names.get(layer)
    if layer in names:
        return layer
    try:
        name = original_dit_name(layer)
    except KeyError:
        return None
    return name if name in names else None


def _shape_error(lora: str, model: str, layer: str, theirs: tuple, ours: tuple) -> CheckpointError:
    return CheckpointError(
        f"LoRA {lora} does not fit model {model}: layer {layer} is {list(theirs)} in the LoRA but {list(ours)} in the "
        "model; the LoRA is for another model family or size"
    )


def _linear_delta(
    file: LoraFile, model: str, name: str, module: nn.Module, parts: dict[str, torch.Tensor], alpha: float | None
) -> LinearDelta:
    ours = (module.out_features, module.in_features)
    down, up = parts.get("down"), parts.get("up")
    if (down is None) != (up is None):
        raise CheckpointError(f"LoRA {file.name}: layer {name} has only one of its two LoRA matrices (down/A and up/B); the file is incomplete")
    if down is not None:
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"LoRA {file.name}: layer {name} has LoRA matrices of shapes {list(down.shape)} (down) and {list(up.shape)} "
                "(up), which are not a low-rank pair of a Linear layer; choose a LoRA made for Wan"
            )
        theirs = (up.shape[0], down.shape[1])
        if theirs != ours:
            raise _shape_error(file.name, model, name, theirs, ours)
        alpha = float(parts["alpha"]) if "alpha" in parts else alpha
    scale = 1.0 if down is None or alpha is None else alpha / down.shape[0]  # no alpha: the term as stored
    diff, diff_b = parts.get("diff"), parts.get("diff_b")
    if diff is not None and tuple(diff.shape) != ours:
        raise _shape_error(file.name, model, f"{name} (weight delta)", tuple(diff.shape), ours)
    if diff_b is not None:
        if module.bias is None:
            raise CheckpointError(f"LoRA {file.name}: layer {name} has a bias delta but the model's layer has no bias")
        if tuple(diff_b.shape) != (ours[0],):
            raise _shape_error(file.name, model, f"{name} (bias delta)", tuple(diff_b.shape), (ours[0],))
    return LinearDelta(down, up, scale, diff, diff_b)


def bind_lora(file: LoraFile, dit: nn.Module, model_name: str = "") -> Lora:
    """``file`` tied to the layers of ``dit``: every key mapped to the layer it patches, shapes checked.
    One-line errors for a layer whose shapes differ (the LoRA of another family or size: the layer and both
    shapes) and for a file none of whose keys match; keys that match nothing are logged by name and count."""
    model_name = model_name or type(dit).__name__
    modules = dict(dit.named_modules())
    params = dict(dit.named_parameters())
    names = set(modules) | set(params)
    flat_names = {name.replace(".", "_"): name for name in names}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    keys_of: dict[str, list[str]] = defaultdict(list)
    unmatched = []
    for key, tensor in file.tensors.items():
        split = _split_key(key)
        name = None if split is None else _resolve(split[0], split[1], names, flat_names)
        if name is None:
            unmatched.append(key)
            continue
        groups[name][split[2]] = tensor
        keys_of[name].append(key)
    alpha = _peft_alpha(file.metadata)
    linears: dict[str, LinearDelta] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        module = modules.get(name)
        if isinstance(module, (nn.Linear, FP8Linear)):
            linears[name] = _linear_delta(file, model_name, name, module, parts, alpha)
            continue
        # a parameter of its own (modulation) or a module's weight/bias (norms, the patch embedding): full deltas only
        targets = {"diff": name} if name in params else {"diff": f"{name}.weight", "diff_b": f"{name}.bias"}
        for part, tensor in parts.items():
            target = targets.get(part)
            if target is None or target not in params:
                unmatched += [k for k in keys_of[name] if _split_key(k)[2] == part]
                continue
            if tuple(tensor.shape) != tuple(params[target].shape):
                raise _shape_error(file.name, model_name, target, tuple(tensor.shape), tuple(params[target].shape))
            deltas[target] = tensor
    if not linears and not deltas:
        raise CheckpointError(
            f"LoRA {file.name}: none of its {len(file.tensors)} keys match a layer of the Wan DiT (first keys: "
            f"{sorted(file.tensors)[:3]}); choose a LoRA made for Wan (its keys name layers such as blocks.0.self_attn.q)"
        )
    if unmatched:
        log.warning("Spacetime: LoRA %s: %d keys match no layer of %s and are ignored: %s%s", file.name, len(unmatched),
                    model_name, sorted(unmatched)[:5], " ..." if len(unmatched) > 5 else "")
    return Lora(file.name, linears, deltas)


# ---- application, for one sampling run ----

@dataclass
class _Terms:
    """Every unmerged LoRA's terms for one Linear layer, stacked: ``up(down(x)) + x @ weight.T + bias`` (strengths
    and scales folded into ``up``, ``weight`` and ``bias``; ranks of several LoRAs concatenated)."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if self.down is not None:
            output = output + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        if self.weight is not None:
            output = output + F.linear(x, self.weight.to(x.dtype))
        if self.bias is not None:
            output = output + self.bias.to(x.dtype)
        return output


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(tensors).sum(0) if tensors else None


def _unmerged_terms(deltas: list[tuple[float, LinearDelta]], device, dtype) -> _Terms:
    cast = dict(device=device, dtype=dtype)
    low_rank = [(s * d.scale, d) for s, d in deltas if d.down is not None]
    down = torch.cat([d.down.to(**cast) for _, d in low_rank]) if low_rank else None
    up = torch.cat([(c * d.up.float()).to(**cast) for c, d in low_rank], dim=1) if low_rank else None
    weight = _sum([s * d.diff.to(device, torch.float32) for s, d in deltas if d.diff is not None])
    bias = _sum([s * d.diff_b.to(device, torch.float32) for s, d in deltas if d.diff_b is not None])
    return _Terms(down, up, None if weight is None else weight.to(**cast), None if bias is None else bias.to(**cast))


class _Swaps:
    """Parameters and buffers replaced for a run, put back (the very same tensor objects) by ``restore``."""

    def __init__(self):
        self._done: list[tuple[dict, str, torch.Tensor]] = []

    def replace(self, owner: nn.Module, attr: str, value: torch.Tensor) -> None:
        table = owner._parameters if attr in owner._parameters else owner._buffers
        self._done.append((table, attr, table[attr]))
        table[attr] = nn.Parameter(value, requires_grad=False) if table is owner._parameters else value

    def restore(self) -> None:
        while self._done:
            table, attr, original = self._done.pop()
            table[attr] = original


def _merge_linear(module: nn.Module, deltas: list[tuple[float, LinearDelta]], compute_dtype: torch.dtype, swaps: _Swaps) -> None:
    """Fold the deltas into the layer's weight and bias, computed on the layer's device (an FP8Linear's weight
    dequantized to ``compute_dtype`` for the run)."""
    weight = module.weight
    weight_deltas = [s * w for s, d in deltas if (w := d.weight_delta(weight.device)) is not None]
    if weight_deltas:
        if isinstance(module, FP8Linear):
            base, dtype = weight.float() * module.scale_weight.float(), compute_dtype
            swaps.replace(module, "scale_weight", torch.ones_like(module.scale_weight))
        else:
            base, dtype = weight.float(), weight.dtype
        swaps.replace(module, "weight", (base + _sum(weight_deltas)).to(dtype))
    bias_deltas = [s * d.diff_b.to(module.bias.device, torch.float32) for s, d in deltas if d.diff_b is not None]
    if bias_deltas:
        swaps.replace(module, "bias", (module.bias.float() + _sum(bias_deltas)).to(module.bias.dtype))


@contextlib.contextmanager
def applied(dit: nn.Module, loras: Sequence[AppliedLora]) -> Iterator[nn.Module]:
    """``with applied(dit, loras):`` the DiT computes with the LoRAs (stacked: their deltas summed) inside the
    block; unmerged ones through forward hooks on their Linear layers, merged ones folded into the weights; the
    deltas of other parameters (modulation, norms) replace them for the block. On exit, also when the block
    raises, the hooks are removed and every original parameter object is back: the state dict is bit-identical."""
    active = [a for a in loras if a.strength != 0.0]  # strength 0 is the base model exactly
    compute_dtype = dit.patch_embedding.weight.dtype
    # unmerged terms live where the DiT computes, also for blocks streamed from CPU memory (small: they stay there)
    compute_device = dit.patch_embedding.weight.device
    swaps, handles = _Swaps(), []
    try:
        with torch.no_grad():
            by_layer: dict[tuple[str, str], list[tuple[float, LinearDelta]]] = defaultdict(list)
            param_deltas: dict[str, list[tuple[float, torch.Tensor]]] = defaultdict(list)
            for item in active:
                for name, delta in item.lora.linears.items():
                    by_layer[(name, item.mode)].append((item.strength, delta))
                for name, delta in item.lora.params.items():
                    param_deltas[name].append((item.strength, delta))
            for (name, mode), deltas in by_layer.items():
                module = dit.get_submodule(name)
                if mode == "merged":
                    _merge_linear(module, deltas, compute_dtype, swaps)
            for (name, mode), deltas in by_layer.items():  # after merging: hooks see the layers as they run
                if mode == "unmerged":
                    module = dit.get_submodule(name)
                    dtype = compute_dtype if isinstance(module, FP8Linear) else module.weight.dtype
                    handles.append(module.register_forward_hook(_unmerged_terms(deltas, compute_device, dtype)))
            for name, deltas in param_deltas.items():
                owner_name, _, attr = name.rpartition(".")
                owner = dit.get_submodule(owner_name)
                original = owner._parameters[attr]
                total = _sum([s * d.to(original.device, torch.float32) for s, d in deltas])
                swaps.replace(owner, attr, (original.float() + total).to(original.dtype))
        yield dit
    finally:
        for handle in handles:
            handle.remove()
        swaps.restore()
