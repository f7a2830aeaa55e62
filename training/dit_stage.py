"""The built-in DiT's training stage: the dataset it learns from (latents of procedural clips with
paraphrased captions, as buckets of one size each) and flow-matching training on it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import get_backend
from ..model_defs.builtin import BUILTIN_DIT_PRESET
from ..model_defs.flow_matching import shift_sigmas
from ..model_defs.text_encoders import MiniLMTextEncoder
from ..model_defs.wan_dit import DIT_PRESETS, WanDiT
from ..model_defs.wan_vae import WanVAE
from .clips import FRAMES, SIZE, render_pool, to_video
from .lr_schedule import cosine_lr
from .procedural import recaption


@torch.no_grad()
def encode_dataset(vae: WanVAE, count: int, seed: int, encoder: MiniLMTextEncoder, text_len: int, log, variants: int = 8,
                   sizes: tuple[tuple[int, int, int], ...] = ((SIZE, SIZE, FRAMES),)):
    """Latents of ``count`` training clips, chunk ``i`` of 64 at ``sizes[i % len(sizes)]`` (height, width,
    frames), and ``variants`` captions of each (its own, then paraphrases of the same content:
    ``procedural.recaption``). Returns the buckets, one per size: ``(latents [n,C,F',h,w], rows [n,
    variants])`` with each clip's rows into the unique captions' embeddings ``[U,L,D]`` (half precision),
    those embeddings, and the row of the empty caption. A caption drawn anew each time a clip is used
    keeps the DiT from learning whole captions by heart (held-out combinations are about its words, not
    its sentences; BENCHMARKS.md has what one caption per clip did)."""
    latents: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    captions: dict[tuple[int, int, int], list[list[str]]] = {}
    for number, chunk in enumerate(range(0, count, 64)):
        size = sizes[number % len(sizes)]
        clips, specs = render_pool(min(64, count - chunk), seed * 7 + chunk, frames=size[2], height=size[0], width=size[1])
        latents.setdefault(size, []).append(vae.encode(to_video(clips).to(next(vae.parameters()).device)).cpu())
        for spec in specs:
            captions.setdefault(size, []).append([spec.caption] + [recaption(spec, spec.seed * 1009 + v) for v in range(1, variants)])
        log(f"encoded {chunk + len(specs)}/{count} clips")
    unique = sorted({c for bucket in captions.values() for clip in bucket for c in clip} | {""})
    embedded = torch.cat([encoder.encode(unique[i: i + 256], text_len).embeddings.cpu().half() for i in range(0, len(unique), 256)])
    log(f"encoded {len(unique)} unique captions")
    row = {caption: i for i, caption in enumerate(unique)}
    buckets = [(torch.cat(latents[size]), torch.tensor([[row[c] for c in clip] for clip in captions[size]])) for size in latents]
    return buckets, embedded, row[""]


def train_dit(buckets, embeddings, empty_row, steps: int, seed: int, log, save, batch: int = 32, save_every: int = 500,
              device: str = "cpu", lr: float = 1e-3, init: dict[str, torch.Tensor] | None = None) -> WanDiT:
    """Flow matching (velocity ``noise - x0``) on batches of one size each (``buckets``: ``(latents,
    caption rows [N, variants])`` per size, drawn in proportion to their clips), one of each clip's
    captions at random, 10% empty captions for classifier-free guidance, AdamW with warm-up and cosine
    decay; returns the EMA of the weights (smoother samples than the last step's weights on a short run),
    and hands it to ``save`` every ``save_every`` steps too, so a long run that is stopped early still
    leaves usable weights. ``init`` (e.g. an earlier run's weights) continues training from those weights
    instead of a fresh start."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dit = WanDiT(DIT_PRESETS[BUILTIN_DIT_PRESET], get_backend(force_reference=True))
    # a small random head, not Wan's zero one: gradients reach the blocks from step one and stay out of
    # the denormal range that slows a CPU backward pass (flush-to-zero does not reach torch's worker threads)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    if init is not None:
        dit.load_state_dict({k: v.float() for k, v in init.items()})
    dit.to(device)
    ema = {name: p.detach().clone() for name, p in dit.named_parameters()}
    optimizer = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.01)
    weights = torch.tensor([float(len(latents)) for latents, _ in buckets])
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup=min(100, steps // 10))
        # one bucket draws nothing, so --no-dit-sizes replays the random stream of runs before the buckets
        latents, caption_rows = buckets[int(torch.multinomial(weights, 1, generator=generator)) if len(buckets) > 1 else 0]
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[index].to(device)
        variant = torch.randint(caption_rows.shape[1], (batch,), generator=generator)
        rows = caption_rows[index, variant]
        rows[torch.rand(batch, generator=generator) < 0.1] = empty_row  # for classifier-free guidance
        context = embeddings[rows].to(device, torch.float32)
        sigma = shift_sigmas(torch.sigmoid(torch.randn(batch, generator=generator)), 2.0)  # logit-normal, shifted
        noise = torch.randn(x0.shape, generator=generator)
        sigma, noise = sigma.to(device), noise.to(device)
        s = sigma[:, None, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        loss = F.mse_loss(dit(x_t, sigma * 1000, context), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, p in dit.named_parameters():
                ema[name].lerp_(p.detach(), 1 - decay)
        if (step + 1) % 100 == 0:
            log(f"dit step {step + 1}: loss {loss.item():.4f}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema)
            log(f"dit step {step + 1}: saved the EMA weights")
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.copy_(ema[name])
    return dit.eval()
