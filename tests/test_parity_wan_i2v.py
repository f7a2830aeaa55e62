"""Image-conditioned Wan DiTs against diffusers: Wan 2.1 I2V (CLIP branch), FLF2V (CLIP branch with learned
positions) and Wan 2.2 I2V (36 channels, no CLIP), every parameter perturbed, saved in the original,
ComfyUI-prefixed and diffusers layouts and loaded through OUR loader with the config detected from the keys;
the real configs' keys and shapes; the conditioning channels against diffusers' I2V pipeline."""
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.checkpoint import load_model
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT
from comfyui_spacetime.model_defs.wan_image import image_condition
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_dit_state_dict, detect_dit_config

# 128-dimensional heads, as every published Wan model, so the loader detects the config from shapes alone
SMALL = dict(num_attention_heads=2, attention_head_dim=128, in_channels=36, out_channels=16, text_dim=20,
             freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True, eps=1e-6)
IMAGE_DIM = 24
KINDS = {  # our model_type and clip branch -> diffusers' extra arguments
    "wan2.1-i2v": dict(image_dim=IMAGE_DIM, added_kv_proj_dim=256),
    "wan2.1-flf2v": dict(image_dim=IMAGE_DIM, added_kv_proj_dim=256, pos_embed_seq_len=514),
    "wan2.2-i2v": dict(),
}
EXPECTED = {"wan2.1-i2v": ("i2v", True), "wan2.1-flf2v": ("flf2v", True), "wan2.2-i2v": ("i2v", False)}
IMAGE_TOKENS = {"wan2.1-i2v": 257, "wan2.1-flf2v": 514, "wan2.2-i2v": 0}
TEXT_LEN = 512  # diffusers finds the image tokens before the last 512 context tokens, as Wan does


@pytest.fixture(scope="module", params=list(KINDS))
def reference(request):
    torch.manual_seed(0)
    model = WanTransformer3DModel(**SMALL, **KINDS[request.param]).eval()
    with torch.no_grad():  # every tensor non-trivial (diffusers zero-initialises emb_pos, LayerNorm biases, ...)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return request.param, model


def _inputs(kind: str, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 36, 3, 6, 10, generator=generator)  # odd grid: 3 x 3 x 5 patches
    context = torch.randn(batch, TEXT_LEN, 20, generator=generator)
    tokens = IMAGE_TOKENS[kind]
    image = torch.randn(batch, tokens, IMAGE_DIM, generator=generator) if tokens else None
    return latents, torch.tensor([999.0, 137.5][:batch]), context, image


def _diffusers_image(kind: str, image):
    if image is None:
        return None
    # diffusers (and Wan) take FLF2V's two images as a batch of 2B x 257 and pair them; ours are [B, 514]
    return image.reshape(-1, 257, IMAGE_DIM) if kind == "wan2.1-flf2v" else image


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_forward_matches_diffusers(reference, layout, tmp_path):
    kind, model = reference
    diffusers_sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        # some diffusers I2V checkpoints carry an unused norm_added_q (diffusers skips it on load; so do we)
        file_sd = {**diffusers_sd, "blocks.0.attn2.norm_added_q.weight": torch.ones(256)}
    else:
        original = convert_diffusers_dit_state_dict(diffusers_sd)
        file_sd = {("model.diffusion_model." if layout == "comfyui" else "") + k: v for k, v in original.items()}
    path = tmp_path / f"{layout}.safetensors"
    save_file(file_sd, path)  # no metadata: the config comes from the keys and shapes
    loaded = load_model(path, torch.float32, REFERENCE)
    ours = loaded.dit
    assert (ours.config.model_type, ours.config.clip_branch) == EXPECTED[kind]
    assert (loaded.needs_clip, loaded.image_channels) == (EXPECTED[kind][1], 20)

    latents, timesteps, context, image = _inputs(kind)
    with torch.no_grad():
        expected = model(latents, timesteps, context, encoder_hidden_states_image=_diffusers_image(kind, image),
                         return_dict=False)[0]
        actual = ours(latents, timesteps, context, image_context=image)
    assert actual.shape == expected.shape == (2, 16, 3, 6, 10)
    assert expected.abs().mean() > 0.1  # a real signal, not an all-zero head
    error = (actual - expected).abs().max().item()
    print(f"{kind} {layout}: max abs error {error:.2e}")
    assert error <= 1e-5
    if image is not None:  # the image branch matters: other CLIP features change the prediction
        with torch.no_grad():
            assert not torch.allclose(ours(latents, timesteps, context, image_context=image.flip(1)), actual)


def test_image_context_errors(reference):
    kind, model = reference
    config = detect_dit_config(convert_diffusers_dit_state_dict(model.state_dict()))
    ours = WanDiT(config, REFERENCE)
    latents, timesteps, context, image = _inputs(kind)
    if image is None:
        with pytest.raises(ValueError, match=r"^image_context was given but this i2v Wan model has no CLIP image branch"):
            ours(latents, timesteps, context, image_context=torch.zeros(2, 257, IMAGE_DIM))
        return
    with pytest.raises(ValueError, match=rf"^image_context is required: this {config.model_type} Wan model has a CLIP image branch"):
        ours(latents, timesteps, context)
    with pytest.raises(ValueError, match=r"^image_context must be \[2, .*, 24\] \(CLIP features\), got \(2, 257, 23\)$"):
        ours(latents, timesteps, context, image_context=torch.zeros(2, 257, 23))
    with pytest.raises(ValueError, match=r"^context must hold text_len=512 tokens"):
        ours(latents, timesteps, context[:, :9], image_context=image)
    packed_error = r"^packing is not supported for image-conditioned \(CLIP\) Wan models; use the Spacetime Sampler$"
    with pytest.raises(ValueError, match=packed_error):
        ours.forward_videos([latents[0]], timesteps[:1], context[:1])


def _diffusers_kwargs(preset: str) -> dict:
    cfg = DIT_PRESETS[preset]
    kwargs = dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                  in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                  ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
    if cfg.clip_branch:
        kwargs.update(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim)
    if cfg.model_type == "flf2v":
        kwargs.update(pos_embed_seq_len=514)
    return kwargs


@pytest.mark.parametrize("preset, detected", [
    ("wan2.1-i2v-14b", "wan2.1-i2v-14b"), ("wan2.1-flf2v-14b", "wan2.1-flf2v-14b"),
    ("wan2.2-i2v-a14b", "wan2.2-i2v-a14b"), ("wan2.2-t2v-a14b", "wan2.1-t2v-14b"),  # same shapes: named 2.1
])
def test_real_config_keys_and_shapes_equal_each_layout(preset, detected):
    with torch.device("meta"):
        ours_sd = WanDiT(DIT_PRESETS[preset], REFERENCE).state_dict()
        theirs = WanTransformer3DModel(**_diffusers_kwargs(preset)).state_dict()
    ours = {k: tuple(v.shape) for k, v in ours_sd.items()}
    converted = {k: tuple(v.shape) for k, v in convert_diffusers_dit_state_dict(theirs).items()}
    assert converted == ours  # original / ComfyUI layout (ComfyUI only adds a prefix)
    assert len(theirs) == len(ours)
    config = detect_dit_config(ours_sd)
    assert config == DIT_PRESETS[preset]
    assert next(name for name, value in DIT_PRESETS.items() if value == config) == detected


def test_real_i2v_sizes():
    with torch.device("meta"):
        sizes = {p: sum(t.numel() for t in WanDiT(DIT_PRESETS[p], REFERENCE).parameters()) / 1e9
                 for p in ("wan2.1-i2v-14b", "wan2.1-flf2v-14b", "wan2.2-i2v-a14b")}
    assert abs(sizes["wan2.1-i2v-14b"] - 16.39) < 0.01  # Wan 2.1 I2V-14B's published 16.4B
    assert 0 < sizes["wan2.1-flf2v-14b"] - sizes["wan2.1-i2v-14b"] < 0.001  # + 514 x 1280 positions
    assert abs(sizes["wan2.2-i2v-a14b"] - 14.29) < 0.01  # each expert: Wan 2.1 T2V-14B + 20 input channels


@pytest.fixture(scope="module")
def i2v_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler())


@pytest.mark.parametrize("frames, last, batch", [(9, False, 1), (13, True, 2), (1, False, 1), (5, True, 1)])
def test_conditioning_channels_match_diffusers(i2v_pipeline, frames, last, batch):
    pipe, height, width = i2v_pipeline, 16, 24
    generator = torch.Generator().manual_seed(2)
    first_image = torch.rand(1, 3, height, width, generator=generator) * 2 - 1
    last_image = torch.rand(1, 3, height, width, generator=generator) * 2 - 1 if last else None
    with torch.no_grad():
        _, expected = pipe.prepare_latents(first_image, batch, 16, height, width, frames, torch.float32, torch.device("cpu"),
                                           generator=torch.Generator().manual_seed(3), last_image=last_image)
        # the caller's part: the conditioning video (known frames, zeros elsewhere), VAE-encoded and normalized
        video = torch.zeros(1, 3, frames, height, width)
        video[:, :, 0] = first_image
        if last:
            video[:, :, -1] = last_image
        raw = pipe.vae.encode(video).latent_dist.mode()
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
        latents = ((raw - mean) / std).expand(batch, -1, -1, -1, -1)
    actual = image_condition(latents, [0, -1] if last else [0], temporal_factor=4)
    assert actual.shape == expected.shape == (batch, 20, 1 + (frames - 1) // 4, height // 8, width // 8)
    assert torch.equal(actual[:, :4], expected[:, :4])  # the mask exactly; the latents differ in rounding only
    error = (actual - expected).abs().max().item()  # diffusers multiplies by 1/std
    print(f"conditioning {frames} frames, last={last}: max abs error {error:.1e}")
    assert error <= 1e-6


def test_conditioning_mask_of_any_known_frames():
    latents = torch.zeros(1, 16, 3, 2, 2)  # 9 pixel frames: latent frame 0 <- frame 0; 1 <- 1..4; 2 <- 5..8
    mask = image_condition(latents, [0, 2, 8], temporal_factor=4)[0, :4, :, 0, 0]  # [4 channels, 3 latent frames]
    assert mask.t().tolist() == [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match=r"^known_frames: frame 9 is outside the video of 9 frames \(allowed: 0\.\.8"):
        image_condition(latents, [9], temporal_factor=4)
