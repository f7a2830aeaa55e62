"""Tiny stand-ins for the Hub weights a shipped workflow names, written in the real key layouts under
the real file names, so those workflows' graphs run in CI without downloads. (They check wiring and
loading, not picture quality.) What a file holds is told by its name, as on the Hub:

- DiTs: ``ti2v`` -> Wan 2.2 TI2V-5B (48 channels in and out); ``flf2v`` -> Wan 2.1 FLF2V (36 channels in, CLIP
  branch with learned positions); ``wan2.1_i2v`` -> Wan 2.1 I2V (36 in, CLIP branch); ``wan2.2_i2v`` -> a Wan 2.2
  I2V expert (36 in, no CLIP); otherwise text-to-video (16 channels). Each under ``model.diffusion_model.``, with
  a seed of its own name (a high- and a low-noise expert differ). Storage as the name says: ``fp8_scaled`` ->
  ComfyUI's scaled fp8 (every Linear weight float8_e4m3fn with a 0-d ``scale_weight`` and ``scale_input``, a
  ``scaled_fp8`` marker, the rest fp16); ``fp8_e4m3fn`` -> Linear weights float8_e4m3fn; ``bf16``; else fp16.
- VAEs: ``2.2`` in the name -> the Wan 2.2 layout (residual stages, 48 channels, 2x2 patches), else Wan 2.1's (16
  channels); both narrower than the ``tiny`` presets (base width 8), as the VAE is most of a stand-in run's time.
- umT5: a 1-layer encoder; ``fp8`` in the name -> ComfyUI's scaled fp8 storage. The tokenizer is stood in for by
  the built-in MiniLM's files.
- CLIP vision: a 2-layer ViT (width 32, 224 px, 14 px patches: 257 tokens, as ViT-H/14) in transformers'
  names under ``vision_model.`` plus ``visual_projection``, fp16, as ComfyUI's clip_vision_h.safetensors.
- Load Image inputs: small PNGs (80x96, another size than the video's, so the resize runs)."""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.fp8 import SCALED_FP8_MARKER
from comfyui_spacetime.model_defs.text_encoders import minilm_dir
from comfyui_spacetime.model_defs.umt5 import UMT5_TOKENIZER_DIR, UMT5_TOKENIZER_FILES
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.model_defs.wan_vae import WanVAE, WanVAEConfig

TEXT_DIM = 32
CLIP_WIDTH = 32
# Wan's real head size (128), so the config is found from shapes alone, as for a real file
STANDIN_DIT = WanDiTConfig(dim=128, ffn_dim=160, freq_dim=32, text_dim=TEXT_DIM, num_heads=1, num_layers=1)
STANDIN_DITS = {  # kind -> config; the kind is told from the file name (dit_kind)
    "t2v": STANDIN_DIT,
    "ti2v": WanDiTConfig(**{**STANDIN_DIT.to_dict(), "in_dim": 48, "out_dim": 48, "model_type": "ti2v"}),
    "i2v-2.2": WanDiTConfig(**{**STANDIN_DIT.to_dict(), "in_dim": 36, "model_type": "i2v"}),
    "i2v-2.1": WanDiTConfig(**{**STANDIN_DIT.to_dict(), "in_dim": 36, "model_type": "i2v", "clip_branch": True, "image_dim": CLIP_WIDTH}),
    "flf2v": WanDiTConfig(**{**STANDIN_DIT.to_dict(), "in_dim": 36, "model_type": "flf2v", "clip_branch": True, "image_dim": CLIP_WIDTH}),
}
STANDIN_VAES = {  # the real VAEs' kinds, narrow; the statistics are not stored (the loader gives the real ones)
    "wan2.1": WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    "wan2.2": WanVAEConfig(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=(1, 2, 2, 2), num_res_blocks=1, residual=True,
                           patch_size=2, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48),
}
STANDIN_CLIP = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                                image_size=224, patch_size=14, projection_dim=16, hidden_act="gelu")
IMAGE_SIZE = (96, 80)  # width, height of the Load Image stand-ins


def dit_kind(name: str) -> str:
    if "ti2v" in name:
        return "ti2v"
    if "flf2v" in name:
        return "flf2v"
    if "i2v" in name:
        return "i2v-2.2" if "wan2.2" in name else "i2v-2.1"
    return "t2v"


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _stored(state: dict[str, torch.Tensor], linear_weights: set[str], name: str) -> dict[str, torch.Tensor]:
    """``state`` in the storage the file name says (see the module docstring)."""
    if "fp8_scaled" in name:
        out = {SCALED_FP8_MARKER: torch.zeros(0, dtype=torch.float8_e4m3fn)}
        for key, value in state.items():
            if key in linear_weights:
                scale = value.abs().max().float() / 448
                layer = key[: -len("weight")]
                out[key] = (value / scale).to(torch.float8_e4m3fn)
                out[layer + "scale_weight"] = scale.reshape(())
                out[layer + "scale_input"] = torch.ones(())
            else:
                out[key] = value.half()
        return out
    if "fp8_e4m3fn" in name:
        return {k: v.to(torch.float8_e4m3fn) if k in linear_weights else v.half() for k, v in state.items()}
    dtype = torch.bfloat16 if "bf16" in name else torch.float16
    return {k: v.to(dtype) for k, v in state.items()}


def _linear_weights(model: torch.nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def write_dit(path: Path) -> None:
    torch.manual_seed(0)
    model = WanDiT(STANDIN_DITS[dit_kind(path.name)], REFERENCE)
    model.init_weights(torch.Generator().manual_seed(_seed(path.name)), zero_head=False)
    state = _stored(model.state_dict(), _linear_weights(model), path.name)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in state.items()}, path)


def write_vae(path: Path) -> None:
    torch.manual_seed(0)
    config = STANDIN_VAES["wan2.2" if "2.2" in path.name else "wan2.1"]
    save_file({k: v.contiguous() for k, v in WanVAE(config).state_dict().items()}, path)


def write_umt5(path: Path) -> None:
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=30522, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu")
    model = UMT5EncoderModel(config)
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if "fp8" in path.name:  # umt5_xxl_fp8_e4m3fn_scaled: ComfyUI's scaled fp8 storage
        state = _stored(state, _linear_weights(model) - {"shared.weight"}, "fp8_scaled")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    tokenizer = path.parent / UMT5_TOKENIZER_DIR
    tokenizer.mkdir(exist_ok=True)
    for name in UMT5_TOKENIZER_FILES + ("vocab.txt",):
        shutil.copy(minilm_dir() / name, tokenizer / name)


def write_clip_vision(path: Path) -> None:
    torch.manual_seed(0)
    state = CLIPVisionModelWithProjection(STANDIN_CLIP).state_dict()
    save_file({k: v.half().contiguous() for k, v in state.items() if not k.endswith("position_ids")}, path)


def write_image(path: Path) -> None:
    """A smooth colour gradient with a bright square: real structure for the VAE and CLIP to encode."""
    width, height = IMAGE_SIZE
    seed = _seed(path.name)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    pixels = np.stack([x, y, (x + y + seed % 7 / 7) % 1.0], axis=-1) * 200
    left, top = seed % (width - 24), seed % (height - 24)
    pixels[top: top + 24, left: left + 24] = 255
    Image.fromarray(pixels.astype(np.uint8)).save(path)


WRITERS = {"diffusion_models": write_dit, "vae": write_vae, "text_encoders": write_umt5, "clip_vision": write_clip_vision}
LOADER_FOLDERS = {
    "SpacetimeModelLoader": "diffusion_models", "SpacetimeVAELoader": "vae", "SpacetimeTextEncoderLoader": "text_encoders",
    "SpacetimeCLIPVisionLoader": "clip_vision",
}


def provide_files(workflow: dict, models_dir: Path, input_dir: Path | None = None) -> list[str]:
    """Write a stand-in for every model file the workflow's loaders name (built-ins need none) and, with
    ``input_dir``, every image its Load Image nodes name. Returns the model files written."""
    written = []
    for node in workflow["nodes"]:
        if node.get("type") == "LoadImage" and input_dir is not None:
            input_dir.mkdir(parents=True, exist_ok=True)
            write_image(input_dir / node["widgets_values"][0])
        folder = LOADER_FOLDERS.get(node.get("type"))
        if folder is None:
            continue
        name = node["widgets_values"][0]
        if name.endswith(".safetensors"):
            (models_dir / folder).mkdir(parents=True, exist_ok=True)
            WRITERS[folder](models_dir / folder / name)
            written.append(name)
    return written


def shrink(workflow: dict, width: int = 64, height: int = 64, frames: int = 17, steps: int = 3) -> dict:
    """The same graph at a CPU-friendly size and step count (64 is on both the Wan 2.1 (16) and 2.2 (32) VAEs'
    grids); an extension generates 9 new frames ending with the input's first 8 (backward) or 12 after its
    last 5 (forward)."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        values = node.get("widgets_values")
        if node["type"] in ("SpacetimeEmptyLatentVideo", "SpacetimeImageToVideo"):
            values[:3] = [width, height, frames]
        if node["type"] == "SpacetimeSampler":
            values[2] = min(values[2], steps)
        if node["type"] == "SpacetimeExtendVideo":
            values[1:3] = [8, 9] if values[0] == "backward" else [5, 12]
    return workflow
