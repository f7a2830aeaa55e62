"""The built-in VAE's training stages: ``vae`` (the whole VAE, from an inflated start) and ``decoder`` (the
decoder alone, under the frozen encoder), and the latent statistics the DiT's latents are normalised by."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..model_defs.builtin import BUILTIN_VAE_PRESET
from ..model_defs.bundles import LatentFormat
from ..model_defs.known_frames import encode_run
from ..model_defs.previews import LatentRGB, fit_latent_rgb
from ..model_defs.wan_vae import VAE_PRESETS, WanVAE
from .clips import FRAMES, SIZE, object_crops, render_pool, render_pool_with_coverage, to_video
from .lr_schedule import cosine_lr
from .metrics import psnr


@torch.no_grad()
def inflate_init(vae: WanVAE) -> WanVAE:
    """Start the causal 3D VAE as an image VAE applied frame by frame ("inflation"): every causal conv
    sees only its current frame (the past time slices of its kernel zeroed), temporal down-sampling keeps
    the last frame of each pair and temporal up-sampling repeats a frame. The first-frame path already
    sees no past, so single-frame steps train exactly what 4-frame chunks then reuse; the temporal
    weights grow from there instead of from noise."""
    from ..model_defs.wan_vae import CausalConv3d, Resample

    for module in vae.modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv  # kernel (3, 1, 1): the last slice is the current frame
            conv.weight.zero_()
            conv.bias.zero_()
            channels = conv.weight.shape[1]
            eye = torch.eye(channels)
            for half in range(conv.weight.shape[0] // channels):  # up-sampling: both output frames copy
                conv.weight[half * channels: (half + 1) * channels, :, -1, 0, 0] = eye
        elif isinstance(module, CausalConv3d) and module.weight.shape[2] > 1:
            module.weight[:, :, :-1].zero_()
    return vae


def encode_run_batch(vae: WanVAE, run: torch.Tensor, start: int) -> torch.Tensor:
    """Latents of a batch of known runs ``[B,3,T,H,W]`` placed at pixel ``start``, encoded exactly as
    video prompts encode one (``known_frames.encode_run``, which takes time-first frames)."""
    batch, channels = run.shape[:2]
    time_first = run.permute(2, 0, 1, 3, 4).flatten(1, 2)  # [T, B*3, H, W]
    return encode_run(lambda frames: vae.encode(frames.unflatten(1, (batch, channels)).permute(1, 2, 0, 3, 4)),
                      time_first, start, vae.config.temporal_factor)


def decoder_step_kinds(clip_steps: bool, cut_steps: bool) -> tuple[str, ...]:
    """The decoder stage's kinds of step, taken in turn: whole frames, plus each kind switched on."""
    return ("frames",) + ("clip",) * clip_steps + ("cut",) * cut_steps


def train_vae(steps: int, seed: int, log, lr: float = 5e-4, shape_weight: float = 3.0, log_every: int = 500,
              vae: WanVAE | None = None, pool_clips: int = 768, device: str = "cpu", clip_steps: bool = False,
              cut_steps: bool = False) -> WanVAE:
    """Trains a VAE for ``steps`` steps, Adam with warm-up and a cosine decay, on crops of a pool of
    ``pool_clips`` training clips; returns it in eval mode, every parameter trainable again.

    Without ``vae`` (the ``vae`` stage): a fresh VAE, inflated (``inflate_init``), trains on single-frame
    32x32 crops. Thanks to the inflation this trains every frame of a video alike. The encoder's temporal
    weights stay at the inflation, so each latent frame holds one frame (the last of its four).

    With a trained ``vae`` (the ``decoder`` stage): only its decoder (with ``conv2``, the 1x1 conv before
    it) trains, on the latents of its frozen encoder, so the latent space the DiT learns stays exactly the
    same. It trains on whole single frames, in turn (``decoder_step_kinds``) with 9-frame clips when
    ``clip_steps`` (from which it learns to fill in the frames between two latent frames from the latent
    frame before) and with ``cut_steps``: clips that cut to another clip at a latent boundary, its frames
    encoded as a known run placed mid-video is (backward extension, connection), so that such a run decodes
    right after any past, even unrelated generated frames, instead of the decoder trusting that past.

    Why crops around the shape, weighted: the shape is what prompts are about, yet it covers a few percent
    of a frame; with random crops and a plain loss the VAE first learns each frame's mean colour and leaves
    the shape unreconstructed for a long time. So crops are centred on the shape (``object_crops``) and its
    pixels weigh ``1 + shape_weight`` in the loss. BENCHMARKS.md ("Built-in model: training history") has
    the measurements behind this recipe."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decoder_only = vae is not None
    if vae is None:
        vae = inflate_init(WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET]))
    vae = vae.to(device)
    trained = [*vae.decoder.parameters(), *vae.conv2.parameters()] if decoder_only else list(vae.parameters())
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    pool, coverage, _ = render_pool_with_coverage(pool_clips, seed)
    held, _ = render_pool(8, seed, held_out=True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    what = "decoder" if decoder_only else "vae"
    kinds = decoder_step_kinds(clip_steps, cut_steps) if decoder_only else ("frames",)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup=min(50, steps // 10))
        # (crop, batch, frames): the VAE stage single-frame crops; the decoder stage whole single frames
        # (crops never show it the middle attention over a whole frame's latents, nor plain background far
        # from the shape, where the cropped VAE left faint ghost blobs), with ``clip_steps`` alternating with
        # 9-frame clips, from which its temporal layers learn the 3 frames between two latent frames
        kind = kinds[step % len(kinds)]
        crop, batch, length = ((48, 2, 9) if kind != "frames" else (SIZE, 4, 1)) if decoder_only else (32, 16, 1)
        index = torch.randint(len(pool), (batch,), generator=generator).numpy()
        frame = int(torch.randint(0, FRAMES - length + 1, (1,), generator=generator))
        pixels, covered = object_crops(pool, coverage, index, frame, generator, crop, length)
        if kind == "cut":
            # a cut to another clip at a latent boundary, whose frames are encoded as a known run placed
            # mid-video is (known_frames.encode_run): what backward extension and connection decode
            other = torch.randint(len(pool), (batch,), generator=generator).numpy()
            start = int(torch.randint(0, FRAMES - 4 + 1, (1,), generator=generator))
            cut_pixels, cut_covered = object_crops(pool, coverage, other, start, generator, crop, 4)
            pixels, covered = np.concatenate([pixels[:, :5], cut_pixels], 1), np.concatenate([covered[:, :5], cut_covered], 1)
        video = to_video(pixels).to(device)
        weight = 1 + shape_weight * torch.from_numpy(covered)[:, None].to(device)  # [N,1,T,H,W]
        with torch.set_grad_enabled(not decoder_only):
            if kind == "cut":
                latent = torch.cat([vae.encode(video[:, :, :5]), encode_run_batch(vae, video[:, :, 5:], start=5)], 2)
            else:
                latent = vae.encode(video)
        error = vae.decode(latent, clamp=False) - video
        loss = (weight * (error.pow(2) + 0.5 * error.abs())).mean() / weight.mean() + 1e-6 * latent.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0:
            with torch.no_grad():
                check = to_video(held[:2]).to(device)
                log(f"{what} step {step + 1}: loss {loss.item():.4f}, held-out PSNR {psnr(vae.decode(vae.encode(check)), check):.2f} dB")
    vae.requires_grad_(True)
    return vae.eval()


@torch.no_grad()
def with_latent_stats(vae: WanVAE, seed: int, clips: int = 256) -> WanVAE:
    """The VAE with its latents' per-channel mean and std (over ``clips`` training clips) in its config:
    the DiT works on latents normalised by them, and they are saved in both files' metadata."""
    device = next(vae.parameters()).device
    latents = torch.cat([vae.encode(to_video(render_pool(min(64, clips - i), seed * 13 + i)[0]).to(device)).cpu() for i in range(0, clips, 64)])
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    vae.config = dataclasses.replace(vae.config, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    return vae


@torch.no_grad()
def fit_preview_rgb(vae: WanVAE, seed: int, clips: int = 64) -> LatentRGB:
    """The latent -> RGB map of the sampler's previews for this VAE (``model_defs.previews``): least squares from
    each normalized latent pixel to the mean colour of the pixels it stands for (its ``sf x sf`` block of its
    frames: frame 0 for latent frame 0, the ``tf`` frames after for each later one), over ``clips`` clips."""
    device = next(vae.parameters()).device
    video = to_video(render_pool(clips, seed * 17 + 5)[0])  # [N,3,T,H,W] in -1..1
    latents = LatentFormat.from_vae_config(vae.config).normalize(vae.encode(video.to(device)).cpu())  # [N,C,T',h,w]
    tf, sf = vae.config.temporal_factor, vae.config.spatial_factor
    first, rest = video[:, :, :1], video[:, :, 1:]
    grouped = torch.cat([first, rest.unflatten(2, (-1, tf)).mean(dim=3)], dim=2)  # [N,3,T',H,W]: each latent frame's frames
    targets = torch.nn.functional.avg_pool3d(grouped, (1, sf, sf))  # [N,3,T',h,w]
    return fit_latent_rgb(latents.movedim(1, -1).reshape(-1, latents.shape[1]), targets.movedim(1, -1).reshape(-1, 3))
