"""Spatially tiled VAE decode and encode (model_defs/vae_tiles.py through jobs/vae_frames.py and the nodes):
close to untiled within the measured tolerance, exactly untiled when one tile covers the frame, the same
shapes and frame counts, and one-line errors for tile sizes the VAE cannot take.

Measured tolerance (pixels in 0..1, latents in raw VAE units; 160x96 frames, 5 frames, 64-px tiles with
the default 16-px overlap: tiles far smaller than the 256-px default, so the seams are many and a tile's
missing context is at its largest):
- built-in VAE, on a clip of moving discs: decode mean |diff| 0.016, max 0.28 (its own reconstruction error
  on this clip: mean 0.070); encode mean 0.019, max 0.31 (latents of std 0.44).
- random "tiny2.2" VAE, on noise (64 px is 4 latent pixels of its 16x factor): decode mean 0.071, max 0.60;
  encode mean 0.044, max 0.36 (latents of std 0.15). Random weights spread a seam over the whole receptive
  field; a trained VAE's effective context is much narrower.
The asserted bounds below are these figures with a margin of 1.5x. At the default tiles (256 px, 64-px
overlap) the difference is far smaller: BENCHMARKS.md ("Tiled VAE") has the built-in VAE's at 640x384.
"""
import re

import pytest
import torch

from comfyui_spacetime.jobs.vae_frames import decode_frames, encode_frames
from comfyui_spacetime.model_defs.bundles import SpacetimeVAE
from comfyui_spacetime.model_defs.vae_tiles import auto_tile_size, blend_ramp, decode_tiled, encode_tiled, tile_spans
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE
from comfyui_spacetime.nodes.vae import SpacetimeVAEDecode, SpacetimeVAEEncode

CPU = torch.device("cpu")
HEIGHT, WIDTH, FRAMES = 96, 160, 5  # not whole tiles of 64 px: 2.5 x 1.5 tiles without overlap


@pytest.fixture(scope="module")
def random22():
    torch.manual_seed(0)
    return SpacetimeVAE(WanVAE(VAE_PRESETS["tiny2.2"]).eval(), "tiny2.2")


def moving_discs(frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """IMAGE frames ``[N,H,W,3]`` in 0..1: two coloured discs crossing a soft gradient (the kind of clip the
    built-in VAE is trained on)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    out = []
    for t in range(frames):
        frame = torch.stack([0.3 + 0.2 * x / width, 0.3 + 0.2 * y / height, torch.full_like(x, 0.4)], dim=-1)
        for cx, cy, r, colour in ((30 + 6 * t, 40, 22, (0.9, 0.1, 0.1)), (120 - 5 * t, 60, 18, (0.1, 0.2, 0.9))):
            inside = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r)[..., None]
            frame = torch.where(inside, torch.tensor(colour), frame)
        out.append(frame)
    return torch.stack(out)


def clip_for(vae: SpacetimeVAE) -> torch.Tensor:
    if vae.name == "tiny2.2":
        torch.manual_seed(1)
        return torch.rand(FRAMES, HEIGHT, WIDTH, 3)
    return moving_discs()


# (decode mean, decode max, encode mean, encode max) bounds: the docstring's measurements x ~1.5
BOUNDS = {"builtin": (0.024, 0.42, 0.028, 0.47), "tiny2.2": (0.11, 0.9, 0.066, 0.54)}


@pytest.mark.parametrize("which", ["builtin", "tiny2.2"])
def test_tiled_is_close_to_untiled_and_keeps_shapes(which, tiny_vae, random22):
    vae = tiny_vae if which == "builtin" else random22
    decode_mean, decode_max, encode_mean, encode_max = BOUNDS[which]
    images = clip_for(vae)
    latent = encode_frames(vae, images, CPU, tile_size=0)
    tiled_latent = encode_frames(vae, images, CPU, tile_size=64)
    assert tiled_latent.shape == latent.shape == (1, vae.latent_channels, 2, HEIGHT // vae.spatial_factor, WIDTH // vae.spatial_factor)
    diff = (tiled_latent - latent).abs()
    assert diff.mean() <= encode_mean and diff.max() <= encode_max, (diff.mean(), diff.max())

    frames = decode_frames(vae, latent, CPU, tile_size=0)
    chunks = []
    tiled = decode_frames(vae, latent, CPU, lambda done, total: chunks.append((done, total)), tile_size=64)
    assert tiled.shape == frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert tiled.min() >= 0 and tiled.max() <= 1
    diff = (tiled - frames).abs()
    assert diff.mean() <= decode_mean and diff.max() <= decode_max, (diff.mean(), diff.max())
    # progress counts every tile's chunks: 2 latent frames x the tiles, steadily up to the total
    assert [done for done, _ in chunks] == list(range(1, len(chunks) + 1)) and all(total == len(chunks) for _, total in chunks)
    tiles = len(tile_spans(HEIGHT // vae.spatial_factor, 64 // vae.spatial_factor, 1)) * len(tile_spans(WIDTH // vae.spatial_factor, 64 // vae.spatial_factor, 1))
    assert len(chunks) == 2 * tiles


def test_feathered_overlap_beats_hard_seams(tiny_vae):
    """128x64 pixels in 64-px tiles: overlap 0 cuts two tiles edge to edge, the default overlap blends three."""
    latent = encode_frames(tiny_vae, moving_discs(height=64, width=128), CPU)
    with torch.inference_mode():
        untiled = tiny_vae.vae.decode(latent)
        feathered = decode_tiled(tiny_vae.vae, latent, 64)  # the default overlap: 16 px
        hard = decode_tiled(tiny_vae.vae, latent, 64, overlap=0)
    errors = [(out - untiled).abs().mean().item() for out in (feathered, hard)]
    assert errors[0] < 0.8 * errors[1], errors


@pytest.fixture(scope="module")
def untiled_results(tiny_vae, random22):
    """Per VAE: (IMAGE clip, latent, frames), straight from ``WanVAE.encode``/``decode``."""
    results = []
    with torch.inference_mode():
        for vae in (tiny_vae, random22):
            images = clip_for(vae)
            latent = vae.vae.encode(images.permute(3, 0, 1, 2).unsqueeze(0).mul(2).sub(1))
            frames = vae.vae.decode(latent).add(1).mul(0.5).clamp(0, 1)[0].permute(1, 2, 3, 0)
            results.append((vae, images, latent, frames))
    return results


@pytest.mark.parametrize("tile_size", [0, 160, 4096])
def test_a_tile_covering_the_frame_is_exactly_untiled(untiled_results, tile_size):
    """0 (auto) is untiled at this size; a tile as large as the frame's longer side or larger is one tile."""
    for vae, images, expected_latent, expected in untiled_results:
        latent = encode_frames(vae, images, CPU, tile_size=tile_size)
        frames = decode_frames(vae, latent, CPU, tile_size=tile_size)
        assert torch.equal(latent, expected_latent) and torch.equal(frames, expected)


def test_nodes_take_tile_size_and_default_to_auto(untiled_results):
    vae, images, expected_latent, expected = untiled_results[1]
    (latent,) = SpacetimeVAEEncode().encode(vae, images)
    (tiled_latent,) = SpacetimeVAEEncode().encode(vae, images, tile_size=64)
    assert torch.equal(latent["samples"], expected_latent) and tiled_latent["samples"].shape == expected_latent.shape
    (frames,) = SpacetimeVAEDecode().decode(vae, latent)
    (tiled,) = SpacetimeVAEDecode().decode(vae, latent, tile_size=96)
    assert torch.equal(frames, expected) and tiled.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_spans_cover_the_length_and_ramps_sum_to_one():
    for length, tile, overlap in ((20, 8, 2), (12, 8, 2), (37, 16, 4), (90, 32, 8), (9, 8, 0), (8, 8, 2), (5, 2, 1)):
        spans = tile_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(stop - start == min(tile, length) for start, stop in spans)
        assert all(b[0] <= a[1] - overlap for a, b in zip(spans, spans[1:]))  # overlaps at least as asked
        total = torch.zeros(length * 4)
        for index, (start, stop) in enumerate(spans):
            total[start * 4: stop * 4] += blend_ramp(spans, index, 4)
        assert (total - 1).abs().max() < 1e-5, (length, tile, overlap, total)


def test_auto_tiles_only_large_frames():
    assert auto_tile_size(0, 480, 832, 8) == 0
    assert auto_tile_size(0, 720, 1280, 8) == 0  # Wan's 720p: as before
    assert auto_tile_size(0, 1080, 1920, 8) == 256
    assert auto_tile_size(0, 1088, 1920, 16) == 256
    assert auto_tile_size(1280, 720, 1280, 8) == 0  # one tile covers the frame
    assert auto_tile_size(512, 720, 1280, 16) == 512


# ---------------------------------------------------------------- bad tile sizes: one line, the input and the allowed values

def _pattern(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize("tile_size, nearest", [(40, "[32, 48]"), (8, "[0, 16]"), (-16, "[0]"), (100, "[96, 112]")])
def test_bad_tile_size_at_run_time_names_the_vae_factor(random22, tile_size, nearest):
    message = _pattern(f"tile_size={tile_size} is not allowed: it must be 0 (auto) or a multiple of 16 (the VAE's spatial factor), "
                       f"in pixels; nearest allowed values: {nearest}")
    latent = torch.zeros(1, 48, 1, 6, 10)
    with pytest.raises(ValueError, match=message):
        decode_frames(random22, latent, CPU, tile_size=tile_size)
    with pytest.raises(ValueError, match=message):
        encode_frames(random22, torch.zeros(1, HEIGHT, WIDTH, 3), CPU, tile_size=tile_size)
    with pytest.raises(ValueError, match=message):
        SpacetimeVAEDecode().decode(random22, {"samples": latent}, tile_size=tile_size)


@pytest.mark.parametrize("node", [SpacetimeVAEDecode, SpacetimeVAEEncode])
def test_bad_tile_size_at_validation(node):
    """At validation the VAE may be linked (not loaded yet): the smallest factor of any supported VAE (8) is
    checked there, the loaded one's at run time with the same wording."""
    result = node.VALIDATE_INPUTS(tile_size=12)
    assert result == ("tile_size=12 is not allowed: it must be 0 (auto) or a multiple of 8 (the VAE's spatial factor), "
                      "in pixels; nearest allowed values: [8, 16]")
    result = node.VALIDATE_INPUTS(tile_size=-32)
    assert result == "tile_size: -32 is out of range; allowed: 0 to 4096"
    result = node.VALIDATE_INPUTS(tile_size=8192)
    assert result == "tile_size: 8192 is out of range; allowed: 0 to 4096"
    result = node.VALIDATE_INPUTS(tile_size=3.5)
    assert result == "tile_size: expects INT, got 3.5"
    assert node.VALIDATE_INPUTS(tile_size=0) is True
    assert node.VALIDATE_INPUTS(tile_size=256) is True
    assert node.VALIDATE_INPUTS(tile_size=None) is True  # linked: checked when the node runs
    assert node.VALIDATE_INPUTS() is True  # a workflow saved before the input existed


def test_bad_overlap(tiny_vae):
    latent = torch.zeros(1, 16, 1, 12, 20)
    with pytest.raises(ValueError, match=_pattern("overlap=64 is not allowed with tile_size=64: it must be a multiple of 8 (the VAE's spatial factor) from 0 to 56")):
        decode_tiled(tiny_vae.vae, latent, 64, overlap=64)
    with pytest.raises(ValueError, match=_pattern("overlap=12 is not allowed with tile_size=64")):
        encode_tiled(tiny_vae.vae, torch.zeros(1, 3, 1, 96, 160), 64, overlap=12)
