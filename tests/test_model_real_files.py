"""The Hub files the Wan 2.1/2.2 workflows name, key for key and shape for shape, with no download: what each file
holds is built on the meta device in its exact storage (the ``model.diffusion_model.`` prefix, the dtype, ComfyUI's
scaled-fp8 extras), then read the way the loader reads it (prefix strip, family, config detection, fp8 preparation,
the strict build of ``checkpoint.build_dit``).

The expected key table of a Wan DiT (``wan_dit_keys``) is written here from Wan's own module (Wan-Video/Wan2.1
``wan/modules/model.py``: ``WanModel``, ``WanAttentionBlock``, ``WanI2VCrossAttention``, ``MLPProj``, ``Head``), not
from our model, so the two are compared, not copied. The scaled-fp8 storage follows a public header capture of
``wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors``: every Linear weight F8_E4M3 with 0-d F32 ``scale_weight`` and
``scale_input``, everything else F16, and a ``scaled_fp8`` marker of shape [0]. For the image-conditioned files the
CLIP branch's Linears (``img_emb.proj.1/3``, ``k_img``, ``v_img``) are taken to be stored the same way (ComfyUI's
scaled ops cover every Linear). What the plain ``fp8_e4m3fn`` files keep in fp8 was not seen: both readings are
tested (Linear weights only; every floating tensor).

The original Wan layout (no prefix) and the diffusers layouts (WanTransformer3DModel / AutoencoderKLWan with the
published configs, converted by ``wan_keys``) are checked against the same tables."""
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.checkpoint import build_dit, detect_family, strip_prefix
from comfyui_spacetime.model_defs.clip_vision import CLIP_VISION_PRESETS, build_clip_vision, detect_clip_vision_config, vision_state_dict
from comfyui_spacetime.model_defs.fp8 import FP8Linear, SCALED_FP8_MARKER, dequantize_fp8
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_dit_state_dict, convert_diffusers_vae_state_dict, detect_dit_config, detect_vae_config
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE

R22, R21 = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged", "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
COMFY_PREFIX = "model.diffusion_model."
FP8 = torch.float8_e4m3fn

# Every DiT file: (repo, file under split_files/diffusion_models/, preset our detection must give, storage).
DIT_FILES = [
    (R22, "wan2.2_ti2v_5B_fp16.safetensors", "wan2.2-ti2v-5b", "fp16"),
    *[(R22, f"wan2.2_{kind}_{noise}_noise_14B_{storage}.safetensors", f"wan2.2-{kind}-a14b", storage)
      for kind in ("t2v", "i2v") for noise in ("high", "low") for storage in ("fp16", "fp8_scaled")],
    *[(R21, f"wan2.1_i2v_{res}_14B_{storage}.safetensors", "wan2.1-i2v-14b", storage)
      for res in ("480p", "720p") for storage in ("fp16", "bf16", "fp8_e4m3fn", "fp8_scaled")],
    *[(R21, f"wan2.1_flf2v_720p_14B_{storage}.safetensors", "wan2.1-flf2v-14b", storage) for storage in ("fp16", "fp8_e4m3fn")],
]
VAE_FILES = [(R22, "vae/wan2.2_vae.safetensors", "wan2.2"), (R21, "vae/wan_2.1_vae.safetensors", "wan2.1")]
CLIP_FILES = [(R21, "clip_vision/clip_vision_h.safetensors", "clip-vit-h-14")]

# The published architectures, in Wan's own terms (wan/configs/*.py of Wan2.1 and Wan2.2).
WAN_ARCH = {
    "wan2.2-ti2v-5b": dict(dim=3072, ffn=14336, layers=30, in_dim=48, out_dim=48),
    "wan2.2-t2v-a14b": dict(dim=5120, ffn=13824, layers=40, in_dim=16, out_dim=16),
    "wan2.2-i2v-a14b": dict(dim=5120, ffn=13824, layers=40, in_dim=36, out_dim=16),
    "wan2.1-i2v-14b": dict(dim=5120, ffn=13824, layers=40, in_dim=36, out_dim=16, clip=True),
    "wan2.1-flf2v-14b": dict(dim=5120, ffn=13824, layers=40, in_dim=36, out_dim=16, clip=True, flf=True),
}
# diffusers' transformer/config.json of Wan-AI's *-Diffusers repos (128-dimensional heads throughout).
DIFFUSERS_DIT = {
    "wan2.2-ti2v-5b": dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
    "wan2.2-t2v-a14b": dict(num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.2-i2v-a14b": dict(num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.1-i2v-14b": dict(num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40,
                           image_dim=1280, added_kv_proj_dim=5120),
    "wan2.1-flf2v-14b": dict(num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40,
                             image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514),
}


def wan_dit_keys(dim, ffn, layers, in_dim, out_dim, clip=False, flf=False, text_dim=4096, freq_dim=256, image_dim=1280) -> dict:
    """key -> shape of Wan's WanModel (original names), patch (1, 2, 2), cross-attention norm on."""
    keys = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (out_dim * 4, dim), "head.head.bias": (out_dim * 4,), "head.modulation": (1, 2, dim),
    }
    for i in range(layers):
        block = {"modulation": (1, 6, dim), "norm3.weight": (dim,), "norm3.bias": (dim,),
                 "ffn.0.weight": (ffn, dim), "ffn.0.bias": (ffn,), "ffn.2.weight": (dim, ffn), "ffn.2.bias": (dim,)}
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                block[f"{attn}.{proj}.weight"], block[f"{attn}.{proj}.bias"] = (dim, dim), (dim,)
            block[f"{attn}.norm_q.weight"] = block[f"{attn}.norm_k.weight"] = (dim,)
        if clip:  # WanI2VCrossAttention
            for proj in ("k_img", "v_img"):
                block[f"cross_attn.{proj}.weight"], block[f"cross_attn.{proj}.bias"] = (dim, dim), (dim,)
            block["cross_attn.norm_k_img.weight"] = (dim,)
        keys.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    if clip:  # MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm
        keys.update({"img_emb.proj.0.weight": (image_dim,), "img_emb.proj.0.bias": (image_dim,),
                     "img_emb.proj.1.weight": (image_dim, image_dim), "img_emb.proj.1.bias": (image_dim,),
                     "img_emb.proj.3.weight": (dim, image_dim), "img_emb.proj.3.bias": (dim,),
                     "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,)})
    if flf:
        keys["img_emb.emb_pos"] = (1, 514, image_dim)
    return keys


def _is_linear_weight(key: str, shape: tuple) -> bool:
    """A Linear's weight in Wan's DiT: every 2-D ``.weight`` (convs are 5-D, norms 1-D, modulations 3-D)."""
    return key.endswith(".weight") and len(shape) == 2


def stored(keys: dict, storage: str, prefix: str, fp8_everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Meta tensors as the file stores them."""
    def meta(shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    out = {}
    for key, shape in keys.items():
        if storage == "fp8_scaled" and _is_linear_weight(key, shape):
            layer = key[: -len("weight")]
            out.update({key: meta(shape, FP8), layer + "scale_weight": meta((), torch.float32), layer + "scale_input": meta((), torch.float32)})
        elif storage == "fp8_e4m3fn" and (fp8_everywhere or _is_linear_weight(key, shape)):
            out[key] = meta(shape, FP8)
        else:
            out[key] = meta(shape, torch.bfloat16 if storage == "bf16" else torch.float16)
    if storage == "fp8_scaled":
        out[SCALED_FP8_MARKER] = meta((0,), FP8)
    return {prefix + key: value for key, value in out.items()}


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def read_like_the_loader(file_state: dict, name: str) -> tuple:
    """What ``checkpoint.load_model`` does after reading the file: the detected config and the model ``build_dit``
    makes, which prepares the fp8 layers and refuses any missing, unexpected or misshapen key."""
    state = strip_prefix(file_state)
    assert detect_family(state) == "Wan DiT"
    config = detect_dit_config(state)
    return config, build_dit(dict(state), config, torch.bfloat16, REFERENCE, name)


def check_dit(file_state: dict, name: str, preset: str, fp8: bool) -> None:
    config, built = read_like_the_loader(file_state, name)
    assert config == DIT_PRESETS[preset], f"{name}: detected {config}"
    weights = {k: v for k, v in _shapes(built.state_dict()).items() if not k.endswith(".scale_weight")}
    assert weights == wan_dit_keys(**WAN_ARCH[preset])  # the model holds exactly Wan's keys and shapes
    # each Linear keeps its weight in fp8 (half the memory), with its scale
    linears = sum(1 for key, shape in weights.items() if _is_linear_weight(key, shape))
    kept = [m for m in built.modules() if isinstance(m, FP8Linear)]
    assert len(kept) == (linears if fp8 else 0) and all(m.weight.dtype == FP8 for m in kept)
    assert sum(1 for m in built.modules() if isinstance(m, torch.nn.Linear)) == (0 if fp8 else linears)


def test_the_file_table_names_every_file_of_the_workflows_families():
    assert len(DIT_FILES) == 1 + 8 + 8 + 2 and len({f for _, f, _, _ in DIT_FILES}) == len(DIT_FILES)


@pytest.mark.parametrize("repo, name, preset, storage", DIT_FILES, ids=[f for _, f, _, _ in DIT_FILES])
def test_dit_file_keys_and_shapes(repo, name, preset, storage):
    readings = [False, True] if storage == "fp8_e4m3fn" else [False]
    for fp8_everywhere in readings:
        file_state = stored(wan_dit_keys(**WAN_ARCH[preset]), storage, COMFY_PREFIX, fp8_everywhere)
        check_dit(file_state, f"{repo}/{name}", preset, storage.startswith("fp8"))


@pytest.mark.parametrize("preset", list(WAN_ARCH))
def test_original_layout_keys_and_shapes(preset):
    """Wan's own files (and any file without ComfyUI's prefix), in bf16 as Wan-AI publishes them."""
    check_dit(stored(wan_dit_keys(**WAN_ARCH[preset]), "bf16", ""), preset, preset, fp8=False)


@pytest.mark.parametrize("preset", list(DIFFUSERS_DIT))
def test_diffusers_layout_equals_wan_keys(preset):
    with torch.device("meta"):
        theirs = WanTransformer3DModel(attention_head_dim=128, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2),
                                       cross_attn_norm=True, eps=1e-6, **DIFFUSERS_DIT[preset]).to(torch.bfloat16).state_dict()
    converted = convert_diffusers_dit_state_dict(theirs)
    assert _shapes(converted) == wan_dit_keys(**WAN_ARCH[preset])
    check_dit(converted, f"{preset} (diffusers)", preset, fp8=False)


def test_the_a14b_experts_detect_as_their_presets_shapes():
    """A T2V-A14B expert has Wan 2.1 T2V-14B's shapes exactly (so one file alone is named by the 2.1 preset); the
    I2V-A14B expert is told apart by its 36 input channels and missing CLIP branch."""
    t2v = detect_dit_config(strip_prefix(stored(wan_dit_keys(**WAN_ARCH["wan2.2-t2v-a14b"]), "fp16", COMFY_PREFIX)))
    i2v = detect_dit_config(strip_prefix(stored(wan_dit_keys(**WAN_ARCH["wan2.2-i2v-a14b"]), "fp16", COMFY_PREFIX)))
    assert t2v == DIT_PRESETS["wan2.2-t2v-a14b"] == DIT_PRESETS["wan2.1-t2v-14b"]
    assert (i2v.model_type, i2v.clip_branch, i2v.in_dim) == ("i2v", False, 36) and i2v == DIT_PRESETS["wan2.2-i2v-a14b"]


# diffusers' vae/config.json: Wan-AI/Wan2.2-TI2V-5B-Diffusers and Wan-AI/Wan2.1-*-Diffusers.
DIFFUSERS_VAE = {
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4),
    "wan2.1": dict(),
}


@pytest.mark.parametrize("repo, name, preset", VAE_FILES, ids=[n for _, n, _ in VAE_FILES])
def test_vae_file_keys_and_shapes(repo, name, preset):
    with torch.device("meta"):
        theirs = AutoencoderKLWan(**DIFFUSERS_VAE[preset]).state_dict()
        ours = WanVAE(VAE_PRESETS[preset])
    # the file: Wan's original names (= diffusers' converted), no prefix, 16-bit
    file_state = {k: torch.empty(v.shape, dtype=torch.float16, device="meta") for k, v in convert_diffusers_vae_state_dict(theirs).items()}
    assert _shapes(file_state) == _shapes(ours.state_dict())
    config = detect_vae_config(strip_prefix(file_state))
    assert config == VAE_PRESETS[preset], f"{repo}/{name}: detected {config}"
    ours.load_state_dict(dequantize_fp8(file_state, torch.bfloat16), assign=True, strict=True)  # as load_vae does
    assert (config.z_dim, config.spatial_factor) == ((48, 16) if preset == "wan2.2" else (16, 8))


@pytest.mark.parametrize("position_ids", [False, True], ids=["plain", "with-position-ids"])
@pytest.mark.parametrize("repo, name, preset", CLIP_FILES, ids=[n for _, n, _ in CLIP_FILES])
def test_clip_vision_file_keys_and_shapes(repo, name, preset, position_ids):
    """clip_vision_h: OpenCLIP ViT-H/14 in transformers' names (CLIPVisionModelWithProjection), fp16; older
    transformers also saved ``position_ids``, which the loader drops."""
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
    with torch.device("meta"):
        theirs = CLIPVisionModelWithProjection(config).half().state_dict()
    file_state = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
    if position_ids:
        file_state["vision_model.embeddings.position_ids"] = torch.empty((1, 257), dtype=torch.int64, device="meta")
    vision = vision_state_dict(file_state)
    assert detect_clip_vision_config(vision) == CLIP_VISION_PRESETS[preset]
    model = build_clip_vision(vision, CLIP_VISION_PRESETS[preset], name)  # strict: raises on any key or shape
    without_ids = {k: v for k, v in _shapes(model.state_dict()).items() if not k.endswith("position_ids")}
    assert without_ids == {k: v for k, v in _shapes(vision).items() if not k.endswith("position_ids")}
    assert len(without_ids) == 3 + 2 + 32 * 16 + 2  # embeddings, pre-norm, 16 tensors a layer, post-norm
