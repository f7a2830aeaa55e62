"""Our CLIP vision loader against transformers' CLIPVisionModel: a small random tower saved with transformers'/
ComfyUI's names (with and without the ``vision_model.`` prefix) and with OpenCLIP's, loaded through OUR loader,
gives the reference's penultimate hidden states; the real ViT-H/14 config's keys and shapes; the node; bad files."""
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from comfyui_spacetime.model_defs.checkpoint import CheckpointError, load_model
from comfyui_spacetime.model_defs.clip_vision import (
    CLIP_VISION_PRESETS, clip_preprocess, detect_clip_vision_config, load_clip_vision, vision_state_dict)

# 64-dimensional heads, so the head count is detected from the width; 42 px / 14 px patches = 3 x 3 + 1 tokens
SMALL = CLIPVisionConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                         image_size=42, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = CLIPVisionModel(SMALL).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _open_clip_names(state_dict: dict, prefix: str = "visual.") -> dict:
    """transformers' names -> OpenCLIP's (the inverse of the loader's conversion, written out here)."""
    top = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        layer, name, kind = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key).groups()
        if name == "self_attn.q_proj":
            qkv = [state_dict[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
        elif name in parts:
            out[f"{prefix}transformer.resblocks.{layer}.{parts[name]}.{kind}"] = value
    hidden = state_dict["embeddings.class_embedding"].shape[0]
    out[prefix + "proj"] = torch.zeros(hidden, 16, device=state_dict["embeddings.class_embedding"].device)
    return out


def _file_state_dict(model, layout: str) -> dict:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    hidden = sd["embeddings.class_embedding"].shape[0]
    if layout == "comfyui":  # transformers' CLIPVisionModelWithProjection names, as ComfyUI's files
        return {**{"vision_model." + k: v for k, v in sd.items()}, "visual_projection.weight": torch.zeros(16, hidden)}
    if layout == "bare":  # transformers 5's CLIPVisionModel.state_dict()
        return sd
    return _open_clip_names(sd)


@pytest.mark.parametrize("layout", ["comfyui", "bare", "openclip"])
def test_encode_matches_transformers(reference, layout, tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file(_file_state_dict(reference, layout), path)
    encoder = load_clip_vision(path, torch.float32)
    assert (encoder.config.num_heads, encoder.config.tokens, encoder.config.image_size) == (2, 10, 42)

    images = torch.rand(2, 50, 61, 3, generator=torch.Generator().manual_seed(1))  # odd sizes: resized and cropped
    pixels = clip_preprocess(images, 42)
    assert pixels.shape == (2, 3, 42, 42)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    actual = encoder.encode(images)
    assert actual.shape == (2, 10, 128) and expected.abs().mean() > 0.1
    error = (actual - expected).abs().max().item()
    print(f"clip vision {layout}: max abs error {error:.2e}")
    assert error <= 1e-5


def test_preprocess_crops_the_center_or_resizes_the_whole_frame():
    images = torch.zeros(1, 30, 60, 3)
    images[:, :, 15:45] = 1.0  # a white square in the middle of a black 2:1 frame
    cropped = clip_preprocess(images, 14)
    whole = clip_preprocess(images, 14, crop=False)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(cropped[0, :, 7, 7], white)  # the crop is the white square
    assert whole[0, 0, 7, 0] < 0 < whole[0, 0, 7, 7]  # the whole frame keeps black sides


def test_real_vit_h_keys_and_shapes():
    preset = CLIP_VISION_PRESETS["clip-vit-h-14"]
    with torch.device("meta"):
        expected = CLIPVisionModel(preset.to_transformers()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    assert preset.tokens == 257 and shapes["embeddings.position_embedding.weight"] == (257, 1280)
    # ViT-H/14 tower: 630.8M parameters; with the 1.3M projection, 1.26 GB in fp16 (clip_vision_h.safetensors' size)
    assert sum(v.numel() for v in expected.values()) / 1e6 == pytest.approx(630.77, abs=0.01)
    for layout in ("comfyui", "openclip"):
        file_sd = ({"vision_model." + k: v for k, v in expected.items()} if layout == "comfyui" else _open_clip_names(expected))
        vision = vision_state_dict(file_sd)
        assert {k: tuple(v.shape) for k, v in vision.items()} == shapes, layout
        assert detect_clip_vision_config(vision) == preset


def test_loader_node(reference, models_dir):
    from comfyui_spacetime.nodes.loaders import SpacetimeCLIPVisionLoader

    (models_dir / "clip_vision").mkdir()
    assert SpacetimeCLIPVisionLoader.INPUT_TYPES()["required"]["clip_name"][0] == ["clip_vision_h.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"^clip_name='clip_vision_h.safetensors': model file not found in the 'clip_vision' folder"):
        SpacetimeCLIPVisionLoader().load("clip_vision_h.safetensors")
    save_file(_file_state_dict(reference, "comfyui"), models_dir / "clip_vision" / "small_clip.safetensors")
    assert SpacetimeCLIPVisionLoader.INPUT_TYPES()["required"]["clip_name"][0] == ["small_clip.safetensors"]
    (clip_vision,) = SpacetimeCLIPVisionLoader().load("small_clip.safetensors")
    assert (clip_vision.name, clip_vision.tokens, clip_vision.feature_dim) == ("small_clip.safetensors", 10, 128)
    assert clip_vision.encode(torch.rand(1, 42, 42, 3)).shape == (1, 10, 128)


def test_wrong_files_are_named(reference, tmp_path):
    dit = tmp_path / "wan_dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2), "head.head.weight": torch.zeros(2, 2)}, dit)
    with pytest.raises(CheckpointError, match=r"^wan_dit.safetensors is not a CLIP vision checkpoint: it holds a Wan DiT\. Choose a CLIP vision file\.$"):
        load_clip_vision(dit, torch.float32)
    clip = tmp_path / "clip_vision_h.safetensors"
    save_file(_file_state_dict(reference, "comfyui"), clip)
    with pytest.raises(CheckpointError, match=r"^clip_vision_h.safetensors is not a Wan DiT \(diffusion model\) checkpoint: it holds a CLIP vision model\."):
        load_model(clip, torch.float32, None)
