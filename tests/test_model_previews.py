"""Latent previews: the published Wan maps, the built-in VAE's fitted map (stored in its file), the preview
images, ComfyUI's progress-bar preview following the user's setting, and the runner's --previews."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_spacetime.headless.runner import main
from comfyui_spacetime.model_defs.bundles import LatentFormat
from comfyui_spacetime.model_defs.checkpoint import latent_format_for, read_latent_rgb
from comfyui_spacetime.model_defs.builtin import VAE_FILE, WEIGHTS_DIR
from comfyui_spacetime.model_defs.previews import PUBLISHED_RGB, fit_latent_rgb, preview_image
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS
from comfyui_spacetime.nodes import comfy_glue
from comfyui_spacetime.training.clips import render_pool, to_video

ROOT = Path(__file__).resolve().parents[1]


def test_published_maps_reach_wan_models_by_channels():
    assert PUBLISHED_RGB["wan2.1"].channels == 16 and PUBLISHED_RGB["wan2.2"].channels == 48
    assert latent_format_for(DIT_PRESETS["wan2.1-t2v-14b"], {}, "x").rgb is PUBLISHED_RGB["wan2.1"]
    assert latent_format_for(DIT_PRESETS["wan2.2-ti2v-5b"], {}, "x").rgb is PUBLISHED_RGB["wan2.2"]


def test_fit_recovers_a_linear_map():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(500, 6, generator=generator)
    true = torch.randn(6, 3, generator=generator) * 0.2
    fitted = fit_latent_rgb(latents, latents @ true + torch.tensor([0.1, -0.2, 0.3]))
    assert torch.allclose(torch.tensor(fitted.factors), true, atol=1e-4)
    assert torch.allclose(torch.tensor(fitted.bias), torch.tensor([0.1, -0.2, 0.3]), atol=1e-4)


def test_builtin_previews_look_like_the_video(tiny_model, tiny_vae):
    """The map stored in the built-in VAE's file turns the latents of held-out clips into their colours: far
    closer than one colour for every clip, and closer than each clip's own mean colour (measured: 0.0107 against
    0.095 and 0.0132 mean squared error)."""
    rgb = read_latent_rgb(WEIGHTS_DIR / VAE_FILE)
    assert rgb is not None and tiny_model.latent_format.rgb == rgb
    video = to_video(render_pool(6, seed=99, held_out=True)[0])  # [N,3,T,H,W] in -1..1
    with torch.no_grad():
        latents = tiny_model.latent_format.normalize(tiny_vae.vae.encode(video))  # [N,C,T',h,w]
    previews = rgb.to_rgb(latents[:, :, 0])  # [N,h,w,3] in 0..1
    target = torch.nn.functional.avg_pool2d(video[:, :, 0], 8).movedim(1, -1).add(1).div(2)  # [N,h,w,3]
    error = (previews - target).pow(2).mean()
    one_colour = (target.mean(dim=(0, 1, 2), keepdim=True) - target).pow(2).mean()
    clip_colour = (target.mean(dim=(1, 2), keepdim=True) - target).pow(2).mean()
    assert error < 0.2 * one_colour and error < clip_colour, (float(error), float(one_colour), float(clip_colour))


def test_preview_images_middle_frame_and_strip():
    rgb = PUBLISHED_RGB["wan2.1"]
    x0 = torch.randn(2, 16, 5, 6, 10)
    assert preview_image(x0, rgb).shape == (6, 10, 3)
    strip = preview_image(x0, rgb, "strip")
    assert strip.shape == (6, 40, 3) and 0 <= strip.min() and strip.max() <= 1
    assert torch.equal(strip[:, :10], rgb.to_rgb(x0[0, :, 0]))  # first, ..., last frame
    with pytest.raises(ValueError, match=r"preview mode 'gif' is not allowed; allowed values: \['middle frame', 'strip'\]"):
        preview_image(x0, rgb, "gif")


@pytest.mark.parametrize("method, shown", [("latent2rgb", True), ("auto", True), ("none", False)])
def test_comfyui_progress_bar_gets_previews_by_the_users_setting(monkeypatch, method, shown):
    updates = []

    class ProgressBar:
        def __init__(self, total, node_id=None):
            pass

        def update_absolute(self, value, total=None, preview=None):
            updates.append(preview)

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(preview_method=types.SimpleNamespace(value=method), preview_size=256)
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    for name, module in {"comfy": comfy, "comfy.utils": utils, "comfy.cli_args": cli_args, "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, module)
    made = []
    progress = comfy_glue.Progress(2, "sampling")
    progress.update(1, lambda: made.append(1) or torch.rand(6, 10, 3))
    if shown:
        kind, image, size = updates[0]
        assert (kind, image.size, size) == ("JPEG", (10, 6), 256)
    else:
        assert updates == [None] and made == []  # not even computed


def test_runner_writes_a_preview_per_step(tmp_path, models_dir):
    workflow = json.loads((ROOT / "workflows" / "spacetime_t2v_builtin.json").read_text())
    steps = next(node["widgets_values"][2] for node in workflow["nodes"] if node["type"] == "SpacetimeSampler")
    previews = tmp_path / "previews"
    assert main([str(ROOT / "workflows" / "spacetime_t2v_builtin.json"), "--output-dir", str(tmp_path / "out"),
                 "--previews", str(previews)]) == 0
    files = sorted(previews.glob("*.png"))
    assert [f.name[-11:] for f in files] == [f"step{i:03d}.png" for i in range(1, steps + 1)]
    with Image.open(files[-1]) as image:
        assert image.size == (8, 8)  # the 64x64 video's middle latent frame, 8x8 latent pixels
        assert np.asarray(image).std() > 0
    assert "SPACETIME_PREVIEWS_DIR" not in __import__("os").environ  # the runner restores the environment
