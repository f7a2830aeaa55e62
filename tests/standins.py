"""Tiny stand-ins for the Hub weights a shipped workflow names, written in the real key layouts under
the real file names, so those workflows' graphs run in CI without downloads. (They check wiring and
loading, not picture quality.) The umT5 tokenizer is stood in for by the built-in MiniLM's files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.text_encoders import minilm_dir
from comfyui_spacetime.model_defs.umt5 import UMT5_TOKENIZER_DIR, UMT5_TOKENIZER_FILES
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE

TEXT_DIM = 32
# Wan's real head size (128), so the config is found from shapes alone, as for a real file
STANDIN_DIT = WanDiTConfig(dim=128, ffn_dim=160, freq_dim=32, text_dim=TEXT_DIM, num_heads=1, num_layers=1)


def write_dit(path: Path) -> None:
    torch.manual_seed(0)
    model = WanDiT(STANDIN_DIT, REFERENCE)
    model.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    save_file({"model.diffusion_model." + k: v.half().contiguous() for k, v in model.state_dict().items()}, path)


def write_vae(path: Path) -> None:
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in WanVAE(VAE_PRESETS["tiny"]).state_dict().items()}, path)


def write_umt5(path: Path) -> None:
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=30522, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu")
    state = UMT5EncoderModel(config).state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if k != "encoder.embed_tokens.weight"}, path)
    tokenizer = path.parent / UMT5_TOKENIZER_DIR
    tokenizer.mkdir(exist_ok=True)
    for name in UMT5_TOKENIZER_FILES + ("vocab.txt",):
        shutil.copy(minilm_dir() / name, tokenizer / name)


WRITERS = {"diffusion_models": write_dit, "vae": write_vae, "text_encoders": write_umt5}
LOADER_FOLDERS = {"SpacetimeModelLoader": "diffusion_models", "SpacetimeVAELoader": "vae", "SpacetimeTextEncoderLoader": "text_encoders"}


def provide_files(workflow: dict, models_dir: Path) -> list[str]:
    """Write a stand-in for every model file the workflow's loaders name (built-ins need none)."""
    written = []
    for node in workflow["nodes"]:
        folder = LOADER_FOLDERS.get(node.get("type"))
        if folder is None:
            continue
        name = node["widgets_values"][0]
        if name.endswith(".safetensors"):
            WRITERS[folder](models_dir / folder / name)
            written.append(name)
    return written


def shrink(workflow: dict, width: int = 64, height: int = 64, frames: int = 17, steps: int = 3) -> dict:
    """The same graph at a CPU-friendly size and step count."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] == "SpacetimeEmptyLatentVideo":
            node["widgets_values"][:3] = [width, height, frames]
        if node["type"] == "SpacetimeSampler":
            node["widgets_values"][2] = min(node["widgets_values"][2], steps)
    return workflow
