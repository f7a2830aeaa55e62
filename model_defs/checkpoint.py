"""Model files, both directions: reading them (safetensors only), recognising what they hold and building
models from them; and writing our own (the built-in model's), with their metadata under the keys below.

Models are built on the meta device and their parameters assigned straight from the file, so a
checkpoint never needs twice its size in RAM. Pickle-based files (.pth/.pt/.ckpt/.bin) are refused.
Files are written to a temporary name beside the target and renamed when complete.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..kernels import KernelBackend
from .bundles import LatentFormat, SpacetimeModel
from .fp8 import FP8_DTYPES, cast_for_compute, dequantize_fp8, prepare_fp8
from .previews import META_LATENT_RGB, PUBLISHED_RGB, LatentRGB
from .wan_dit import DIT_PRESETS, WanDiT, WanDiTConfig
from .wan_keys import REAL_VAE_PRESETS, MissingKeysError, convert_diffusers_dit_state_dict, convert_diffusers_vae_state_dict, detect_dit_config, detect_vae_config
from .wan_vae import VAE_PRESETS, WanVAE, WanVAEConfig

# Metadata keys of the files we write (JSON values): the configs and the latent statistics a DiT was trained in.
META_DIT_CONFIG = "spacetime_dit_config"
META_VAE_CONFIG = "spacetime_vae_config"
META_LATENT_FORMAT = "spacetime_latent_format"

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Keys that identify what a file holds, for error messages that say what a wrong file is.
FAMILY_MARKERS = {
    "Wan DiT": ("blocks.0.self_attn.q.weight", "head.head.weight"),
    "Wan DiT (diffusers layout)": ("condition_embedder.time_embedder.linear_1.weight",),
    "Wan VAE": ("encoder.conv1.weight", "decoder.conv1.weight"),
    "Wan VAE (diffusers layout)": ("encoder.conv_in.weight", "quant_conv.weight"),
    "CLIP vision model": ("vision_model.embeddings.patch_embedding.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"),
    "umT5 text encoder": ("encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"),
    "Stable Diffusion UNet": ("input_blocks.0.0.weight",),
    "Flux / MMDiT": ("double_blocks.0.img_attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.weight"),
}


class CheckpointError(ValueError):
    """A model file that cannot be used, with what was expected."""


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file, with clear errors for the usual mistakes.
    With ``dtype``, floating-point tensors are cast one at a time as they are read (fp8 ones are kept),
    so loading never holds the file in two precisions at once."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: pickle-based files ({', '.join(PICKLE_SUFFIXES)}) are refused because loading them can "
            "run arbitrary code. Download the .safetensors version of this model instead (e.g. from "
            "Comfy-Org/Wan_2.1_ComfyUI_repackaged)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}")
    try:
        tensors, metadata = _read_tensors(path, dtype)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:  # a truncated or garbled file
        raise CheckpointError(
            f"{path.name} is not a readable .safetensors file (truncated download or another format?): {exc}. "
            "Download it again."
        ) from exc
    return tensors, metadata


# safetensors' dtype names (the format: an 8-byte little-endian header length, a JSON header of
# {name: {dtype, shape, data_offsets}} and "__metadata__", then the tensors' bytes, little-endian)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


def _read_tensors(path: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file read tensor by tensor with plain reads (no memory map: mapped pages of the file would count in
    the process's memory beside the copies), in file order so the disk reads straight through. A tensor cast
    to ``dtype`` is read into one reused scratch buffer and converted into its final tensor, so nothing but
    the result and one tensor's bytes is ever held: about the model's size in ``dtype`` at the peak."""
    size = path.stat().st_size
    scratch = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {length} does not fit a file of {size} bytes")
        header = json.loads(handle.read(length))
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        base = 8 + length
        tensors = {}
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = (int(v) for v in info["data_offsets"])
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            cast = dtype is not None and stored.is_floating_point and stored not in FP8_DTYPES and stored != dtype
            count = end - start
            if count != math.prod(shape) * stored.itemsize or base + end > size:
                raise ValueError(f"tensor {key!r}: bytes {start}..{end} do not hold {info['dtype']} {shape} in a file of {size} bytes")
            if cast and scratch.numel() < count:
                scratch = torch.empty(count, dtype=torch.uint8)
            raw = scratch[:count] if cast else torch.empty(count, dtype=torch.uint8)
            handle.seek(base + start)
            if count and handle.readinto(raw.numpy()) != count:
                raise ValueError(f"tensor {key!r} ends past the end of the file")
            tensor = raw.view(stored).view(shape)
            tensors[key] = torch.empty(shape, dtype=dtype).copy_(tensor) if cast else tensor
    return tensors, metadata


def return_memory_when_freed(module: torch.nn.Module) -> torch.nn.Module:
    """Give a loaded model's RAM back to the system once all its tensors are garbage: glibc keeps freed heap
    memory for reuse, so without ``malloc_trim`` a model the user dropped would still count against the
    machine. (A finalizer on the module itself would run before its tensors are freed.)"""
    tensors = list(module.parameters()) + list(module.buffers())
    remaining = [len(tensors)]

    def one_freed() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            _malloc_trim()

    for tensor in tensors:
        weakref.finalize(tensor, one_freed)
    return module


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): the allocator returns memory its own way
        pass


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Like ``read_safetensors``, but a shard named ``<stem>-0000i-of-0000n.safetensors`` (diffusers'
    large transformers) brings all n shards of its set."""
    path = Path(path)
    shard = _SHARD.match(path.name)
    if shard is None:
        return read_safetensors(path, dtype)
    count = int(shard["count"])
    tensors, metadata = {}, {}
    for index in range(1, count + 1):
        part = path.with_name(f"{shard['stem']}-{index:05d}-of-{count:05d}.safetensors")
        if not part.is_file():
            raise CheckpointError(f"{path.name} is shard {int(shard['index'])} of {count}, but {part.name} is missing beside it")
        part_tensors, part_metadata = read_safetensors(part, dtype)
        tensors.update(part_tensors)
        metadata.update(part_metadata)
    return tensors, metadata


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a prefix shared by every key (ComfyUI's ``model.diffusion_model.`` and the like)."""
    for prefix in PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def detect_family(state_dict: dict[str, torch.Tensor]) -> str | None:
    for family, markers in FAMILY_MARKERS.items():
        if any(marker in state_dict for marker in markers):
            return family
    return None


def wrong_family_error(name: str, expected: str, state_dict: dict) -> CheckpointError:
    found = detect_family(state_dict)
    what = f"it holds a {found}" if found else f"its keys are not a known layout (first keys: {sorted(state_dict)[:3]})"
    return CheckpointError(f"{name} is not a {expected} checkpoint: {what}. Choose a {expected} file.")


def _config_from_metadata(metadata: dict[str, str], key: str) -> dict | None:
    raw = metadata.get(key)
    return json.loads(raw) if raw else None


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a hidden ``.partial`` file beside ``path``, renamed when complete, so a reader (or a
    run stopped mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def save_vae(vae: WanVAE, path: str | Path, rgb: LatentRGB | None = None) -> None:
    """A VAE file our loader reads back with its config (``META_VAE_CONFIG``) and, when given, the latent -> RGB
    map of previews (``META_LATENT_RGB``)."""
    metadata = {META_VAE_CONFIG: json.dumps(vae.config.to_dict())}
    if rgb is not None:
        metadata[META_LATENT_RGB] = rgb.to_json()
    write_safetensors(path, vae.state_dict(), metadata)


def read_latent_rgb(path: str | Path) -> LatentRGB | None:
    """The preview map stored in a model file's metadata, or None."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        text = (handle.metadata() or {}).get(META_LATENT_RGB)
    return LatentRGB.from_json(text) if text else None


def save_dit(state_dict: dict[str, torch.Tensor], config: WanDiTConfig, latent_format: LatentFormat, path: str | Path) -> None:
    """A DiT file (weights stored fp16) with its config and the latent statistics it was trained in."""
    latent = {"channels": latent_format.channels, "mean": list(latent_format.mean), "std": list(latent_format.std)}
    metadata = {META_DIT_CONFIG: json.dumps(config.to_dict()), META_LATENT_FORMAT: json.dumps(latent)}
    if latent_format.rgb is not None:
        metadata[META_LATENT_RGB] = latent_format.rgb.to_json()
    write_safetensors(path, {k: v.half() for k, v in state_dict.items()}, metadata)


def _detected(name: str, what: str, detect, state_dict: dict):
    try:
        return detect(state_dict)
    except MissingKeysError as exc:
        raise CheckpointError(
            f"{name} is not a whole {what}: it lacks the keys {list(exc.args[0])}. The file may be truncated or "
            "hold only part of a model; download it again or choose the full model file."
        ) from None


def build_dit(
    state_dict: dict[str, torch.Tensor], config: WanDiTConfig, dtype: torch.dtype, backend: KernelBackend, name: str
) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(config, backend)
    state_dict = prepare_fp8(model, state_dict)  # fp8-stored Linears stay fp8 (no-op otherwise)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not match the Wan DiT layout for config {config}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}."
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{name}: tensor {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(tensor.shape)}."
            )
    model.load_state_dict(cast_for_compute(state_dict, dtype), assign=True)
    return return_memory_when_freed(model.eval().requires_grad_(False))


def read_family(path: str | Path, dtype: torch.dtype, family: str, expected: str, convert_diffusers) -> tuple[dict, dict]:
    """State dict and metadata of a file that must hold ``family`` (original/ComfyUI names, prefix
    stripped); a diffusers-layout file of that family is converted, anything else is refused."""
    state_dict, metadata = read_checkpoint(path, dtype)
    state_dict = strip_prefix(state_dict)
    found = detect_family(state_dict)
    if found == f"{family} (diffusers layout)":
        return convert_diffusers(state_dict), metadata
    if found != family:
        raise wrong_family_error(Path(path).name, expected, state_dict)
    return state_dict, metadata


def load_vae(path: str | Path, dtype: torch.dtype) -> WanVAE:
    """A Wan 2.1 or 2.2 VAE from an original/ComfyUI or diffusers-layout safetensors file."""
    name = Path(path).name
    state_dict, metadata = read_family(path, dtype, "Wan VAE", "Wan VAE", convert_diffusers_vae_state_dict)
    stored = _config_from_metadata(metadata, META_VAE_CONFIG)
    config = WanVAEConfig.from_dict(stored) if stored is not None else _detected(name, "Wan VAE", detect_vae_config, state_dict)
    with torch.device("meta"):
        model = WanVAE(config)
    try:
        model.load_state_dict(dequantize_fp8(state_dict, dtype), assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name} does not match the Wan VAE layout: {exc}") from exc
    return return_memory_when_freed(model.eval().requires_grad_(False))


def latent_format_for(config: WanDiTConfig, metadata: dict[str, str], name: str) -> LatentFormat:
    """The latent statistics a DiT was trained with: recorded in the file, or those of the published VAE
    with its channel count (Wan 2.1's for 16, Wan 2.2's for 48)."""
    stored = _config_from_metadata(metadata, META_LATENT_FORMAT)
    if stored is not None:
        rgb = LatentRGB.from_json(metadata[META_LATENT_RGB]) if META_LATENT_RGB in metadata else None
        return LatentFormat(int(stored["channels"]), tuple(stored["mean"]), tuple(stored["std"]), rgb)
    for preset in REAL_VAE_PRESETS:
        if config.out_dim == VAE_PRESETS[preset].z_dim:
            return LatentFormat.from_vae_config(VAE_PRESETS[preset], PUBLISHED_RGB.get(preset))
    allowed = ", ".join(f"{VAE_PRESETS[p].z_dim} ({p} VAE)" for p in REAL_VAE_PRESETS)
    raise CheckpointError(f"{name} predicts {config.out_dim}-channel latents; supported: {allowed}.")


def load_model(path: str | Path, dtype: torch.dtype, backend: KernelBackend) -> SpacetimeModel:
    """SPACETIME_MODEL from a Wan DiT file (original, ComfyUI or diffusers layout): text-to-video, or image-to-video
    (Wan 2.1 I2V / FLF2V with their CLIP branch, Wan 2.2 I2V), the kind told from the keys."""
    name = Path(path).name
    state_dict, metadata = read_family(path, dtype, "Wan DiT", "Wan DiT (diffusion model)", convert_diffusers_dit_state_dict)
    stored = _config_from_metadata(metadata, META_DIT_CONFIG)
    config = WanDiTConfig.from_dict(stored) if stored is not None else _detected(name, "Wan DiT", detect_dit_config, state_dict)
    dit = build_dit(state_dict, config, dtype, backend, name)
    preset = next((key for key, value in DIT_PRESETS.items() if value == config), None)
    return SpacetimeModel(dit, latent_format_for(config, metadata, name), name, preset)
