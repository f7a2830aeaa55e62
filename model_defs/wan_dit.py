"""Wan 2.1 / 2.2 diffusion transformer (DiT) over spacetime patches, text- and image-to-video.

Source: Wan-Video/Wan2.1 `wan/modules/model.py` (architecture and parameter names, which the original and
ComfyUI-repackaged checkpoints use). Block: AdaLN modulation from the timestep -> self-attention with
q/k RMSNorm and 3D RoPE -> cross-attention to text (and, for Wan 2.1 I2V/FLF2V, to CLIP image tokens:
`wan_image`) -> gated FFN. Precision policy: parameters in the load dtype; timestep embedding, modulation
and norm statistics in fp32 (as Wan does).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..kernels import KernelBackend, get_backend
from .layers import config_from_dict, patchify, rope_3d_tables, sinusoidal_embedding, unpatchify
from .sizes import patch_grid
from .token_layouts import DenseLayout, Pack, PackedLayout, PackedText, TokenLayout, make_pack, pack_text
from .wan_image import ImageEmbedding, check_image_context

MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")


@dataclass(frozen=True)
class WanDiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    # "t2v"; "i2v": conditioning channels concatenated to the latents (in_dim = out_dim + 4 mask + out_dim image
    # latents); "flf2v": i2v for a first and a last frame, whose CLIP tokens get learned positions (img_emb.emb_pos);
    # "ti2v": Wan 2.2 TI2V-5B, a t2v architecture trained with per-token timesteps (a known first frame at 0)
    model_type: str = "t2v"
    clip_branch: bool = False  # CLIP image branch: img_emb + k_img/v_img (Wan 2.1 I2V/FLF2V; Wan 2.2 I2V has none)
    image_dim: int = 1280  # CLIP ViT-H feature size, used when clip_branch

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not allowed; allowed values: {list(MODEL_TYPES)}")
        if self.model_type == "flf2v" and not self.clip_branch:
            raise ValueError("model_type='flf2v' needs clip_branch=True (its first/last-frame CLIP tokens have learned positions)")
        if self.model_type in ("t2v", "ti2v") and self.clip_branch:
            raise ValueError(f"clip_branch=True needs model_type 'i2v' or 'flf2v'; a {self.model_type!r} Wan DiT has no image branch")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def image_channels(self) -> int:
        """Conditioning channels the caller concatenates after the noisy latents (0 for text-to-video)."""
        return self.in_dim - self.out_dim if self.model_type in ("i2v", "flf2v") else 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WanDiTConfig":
        return config_from_dict(cls, data)


def _gelu_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, out_dim))


class RMSNorm(nn.Module):
    """Weighted RMSNorm, followed by the 3D RoPE when ``rope`` (cos, sin ``[S, D/2]``) is given: q and k are
    rotated here, once per token, in one fused op; the kernels are chosen by the model's backend."""

    def __init__(self, dim: int, eps: float, backend: KernelBackend):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._rms_norm = backend.rms_norm
        self._rms_norm_rope = backend.rms_norm_rope

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if rope is None:
            return self._rms_norm(x, self.weight, self.eps)
        return self._rms_norm_rope(x, self.weight, *rope, self.eps)


class WanAttention(nn.Module):
    """Multi-head attention with q/k RMSNorm over all heads; self-attention when ``context`` is None, with
    q and k rotated by ``rope`` (the layout's tables) in the norm. ``attend(q, k, v, heads)`` is the layout's
    attention (``token_layouts``)."""

    def __init__(self, dim: int, num_heads: int, eps: float, backend: KernelBackend):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps, backend)
        self.norm_k = RMSNorm(dim, eps, backend)

    def forward(
        self, x: torch.Tensor, attend: Callable[..., torch.Tensor], context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        source = x if context is None else context  # [.., Sk, C]
        q = self.norm_q(self.q(x), rope)  # [.., Sq, C], rotated when rope is given
        k = self.norm_k(self.k(source), rope)  # [.., Sk, C]
        v = self.v(source)  # [.., Sk, C]
        return self.o(attend(q, k, v, self.num_heads))  # [.., Sq, C]


class WanImageCrossAttention(WanAttention):
    """Cross-attention of the CLIP image branch (Wan 2.1 I2V/FLF2V): ``context`` is the image tokens followed by
    the ``text_len`` text tokens; q attends to each separately (the image ones through ``k_img``, ``v_img``,
    ``norm_k_img``) and the two results are summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, backend: KernelBackend, text_len: int):
        super().__init__(dim, num_heads, eps, backend)
        self.text_len = text_len
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps, backend)

    def forward(self, x: torch.Tensor, attend: Callable[..., torch.Tensor], context: torch.Tensor | None = None) -> torch.Tensor:
        image, text = context[:, : -self.text_len], context[:, -self.text_len :]  # [B,Li,C], [B,L,C]
        q = self.norm_q(self.q(x))  # [B,S,C]
        out = attend(q, self.norm_k(self.k(text)), self.v(text), self.num_heads)  # [B,S,C]
        out_image = attend(q, self.norm_k_img(self.k_img(image)), self.v_img(image), self.num_heads)  # [B,S,C]
        return self.o(out + out_image)  # [B,S,C]


class WanBlock(nn.Module):
    def __init__(self, config: WanDiTConfig, backend: KernelBackend):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.self_attn = WanAttention(dim, config.num_heads, config.eps, backend)
        self.norm3 = (
            nn.LayerNorm(dim, eps=config.eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        )
        if config.clip_branch:
            self.cross_attn = WanImageCrossAttention(dim, config.num_heads, config.eps, backend, config.text_len)
        else:
            self.cross_attn = WanAttention(dim, config.num_heads, config.eps, backend)
        self.ffn = _gelu_mlp(dim, config.ffn_dim, dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self._modulate = backend.layer_norm_modulate
        self._gated_residual = backend.gated_residual

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, context: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        # x [B,S,C] (dense) or [1,T,C] (packed); time_mod [N,6,C] fp32, one row per sample, sequence or latent frame;
        # context [B,L,C] or [1,Tk,C]
        tok = layout.per_token  # [N,C] -> broadcastable to x
        mod = self.modulation.float() + time_mod  # [N,6,C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # [N,C] each
        y = self.self_attn(self._modulate(x, tok(shift_msa), tok(scale_msa), self.eps), layout.self_attention, rope=layout.rope)  # like x
        x = self._gated_residual(x, y, tok(gate_msa))  # like x
        x = x + self.cross_attn(self.norm3(x), layout.cross_attention, context)  # like x
        y = self.ffn(self._modulate(x, tok(shift_mlp), tok(scale_mlp), self.eps))  # like x
        return self._gated_residual(x, y, tok(gate_mlp))  # like x


class WanHead(nn.Module):
    def __init__(self, config: WanDiTConfig, backend: KernelBackend):
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)
        self._modulate = backend.layer_norm_modulate

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        # x [B,S,C] or [1,T,C]; time_emb [N,C] fp32
        shift, scale = (self.modulation.float() + time_emb[:, None, :]).unbind(1)  # [N,C] each
        return self.head(self._modulate(x, layout.per_token(shift), layout.per_token(scale), self.eps))  # [.., pt*ph*pw*out]


class WanDiT(nn.Module):
    """Predicts the flow-matching velocity for latents ``[B, in_dim, F, H, W]`` at timesteps ``[B]``
    (0..1000) given text context ``[B, L, text_dim]``."""

    def __init__(self, config: WanDiTConfig, backend: KernelBackend | None = None):
        super().__init__()
        backend = backend or get_backend()
        self.config = config
        self.backend = backend  # the resolved kernels; the token layouts attend with them
        self.backend_name = backend.name
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = _gelu_mlp(config.text_dim, dim, dim)
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.img_emb = ImageEmbedding(config.image_dim, dim, config.model_type == "flf2v") if config.clip_branch else None
        self.blocks = nn.ModuleList(WanBlock(config, backend) for _ in range(config.num_layers))
        self.head = WanHead(config, backend)
        self.step_cache = None  # a step_cache.StepCacheRun while a sampling run caches steps (step_cache.cached)
        self.parallel = None  # a parallel.sequence.DiTParallel when this rank computes its part (parallelize)

    def init_weights(self, generator: torch.Generator | None = None, zero_head: bool = True) -> None:
        """Wan's initialisation (Xavier for linears, zero biases, zero output head), seeded. ``zero_head=False``
        keeps the head random, so an untrained model's prediction still depends on its inputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_in, fan_out = module.weight.shape[1], module.weight.shape[0]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                with torch.no_grad():
                    module.weight.uniform_(-bound, bound, generator=generator)
                    module.bias.zero_()
        with torch.no_grad():
            flat = self.patch_embedding.weight.flatten(1)
            bound = math.sqrt(6.0 / (flat.shape[0] + flat.shape[1]))
            self.patch_embedding.weight.uniform_(-bound, bound, generator=generator)
            self.patch_embedding.bias.zero_()
            for block in self.blocks:
                block.modulation.normal_(generator=generator).div_(self.config.dim**0.5)
            self.head.modulation.normal_(generator=generator).div_(self.config.dim**0.5)
            if zero_head:
                self.head.head.weight.zero_()

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Velocity ``[B,Cout,F,H,W]`` fp32 for latents ``[B,Cin,F,H,W]`` at timesteps ``[B]`` (0..1000), or
        ``[B,F']`` one per latent frame (per-token timesteps, as Wan 2.2 TI2V), given context ``[B,L,text_dim]``
        (zero-padded text, attended to whole as Wan does). Image-to-video models take their conditioning
        channels inside ``latents`` (``image_condition``), and the CLIP branch's ``image_context``
        ``[B, 257 (i2v) or 514 (flf2v: first then last frame), image_dim]`` (penultimate CLIP ViT-H features)."""
        check_image_context(self.config, latents.shape[0], context, image_context)
        cfg = self.config
        grid = patch_grid(latents.shape, cfg.patch_size)  # (F', H', W')
        per_frame = timesteps.ndim == 2
        if timesteps.shape not in ((latents.shape[0],), (latents.shape[0], grid[0])):
            raise ValueError(
                f"timesteps must be [{latents.shape[0]}] (one per video) or [{latents.shape[0]}, {grid[0]}] (one per "
                f"latent frame) for latents {tuple(latents.shape)}, got {tuple(timesteps.shape)}"
            )
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))  # [B,C,F',H',W']
        x = rearrange(x, "b c f h w -> b (f h w) c")  # [B,S,C]
        rope = rope_3d_tables(grid, cfg.head_dim, device=latents.device)
        layout = DenseLayout(self.backend, rope, grid if per_frame else None)
        x = self._transformer(x, timesteps.flatten(), context, layout, image_context)  # [B,S,pt*ph*pw*Cout]
        return unpatchify(x.float(), grid, cfg.patch_size)  # [B,Cout,F,H,W]

    def forward_packed(self, pack: Pack, tokens: torch.Tensor, timesteps: torch.Tensor, text: PackedText) -> torch.Tensor:
        """The DiT on a pack: tokens ``[T, pt*ph*pw*in_dim]`` (``patchify`` order), timesteps ``[N]`` (0..1000,
        one per sequence) or ``[pack.num_frames]`` (one per latent frame, sequences in order), text packed
        ``[Tk, text_dim]`` -> velocity patch vectors ``[T, pt*ph*pw*out_dim]`` fp32."""
        if self.config.clip_branch:
            raise ValueError("packing is not supported for image-conditioned (CLIP) Wan models; use the Spacetime Sampler")
        total = sum(pack.lengths)
        if tokens.ndim != 2 or tokens.shape[0] != total:
            raise ValueError(f"tokens must be [{total}, P] for this pack, got {tuple(tokens.shape)}")
        allowed = ((pack.num_sequences,), (pack.num_frames,))
        if timesteps.shape not in allowed or text.cu_seqlens.shape != pack.cu_seqlens.shape:
            raise ValueError(
                f"a pack of {pack.num_sequences} sequences ({pack.num_frames} latent frames) needs timesteps "
                f"[{pack.num_sequences}] or [{pack.num_frames}] and {pack.num_sequences} contexts, "
                f"got timesteps {tuple(timesteps.shape)} and {text.cu_seqlens.numel() - 1} contexts"
            )
        embed = self.patch_embedding
        embed_weight = rearrange(embed.weight, "d c p q r -> d (p q r c)")  # [C, P]: the Conv3d as a linear
        x = F.linear(tokens.to(embed.weight.dtype), embed_weight, embed.bias)[None]  # [1,T,C]
        per_frame = timesteps.shape[0] != pack.num_sequences  # equal counts: one frame each, the same rows
        x = self._transformer(x, timesteps, text.tokens[None], PackedLayout(self.backend, pack, text, per_frame))  # [1,T,P']
        return x[0].float()  # [T,P']

    def forward_videos(self, latents: list[torch.Tensor], timesteps: torch.Tensor, contexts: torch.Tensor) -> list[torch.Tensor]:
        """N videos of different sizes in one packed pass: latents ``[in_dim, F_i, H_i, W_i]``, timesteps
        ``[N]`` (or ``[sum F_i']``, one per latent frame of every video in order), contexts ``[N, L, text_dim]``
        -> N velocities ``[out_dim, F_i, H_i, W_i]`` fp32, each what ``self(latents[i][None], its timesteps,
        contexts[i:i+1])[0]`` gives."""
        if self.config.clip_branch:
            raise ValueError("packing is not supported for image-conditioned (CLIP) Wan models; use the Spacetime Sampler")
        if len(latents) != contexts.shape[0]:
            raise ValueError(f"{len(latents)} latents need as many contexts, got {contexts.shape[0]}")
        patch = self.config.patch_size
        grids = [patch_grid(latent.shape, patch) for latent in latents]
        pack = make_pack(grids, self.config.head_dim, latents[0].device)
        tokens = torch.cat([patchify(latent, patch) for latent in latents])  # [T,P]
        out = self.forward_packed(pack, tokens, timesteps, pack_text(contexts))  # [T,P']
        return [unpatchify(part, grid, patch) for part, grid in zip(out.split(pack.lengths), grids)]

    def _transformer(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, layout: TokenLayout,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedded tokens x (``[B,S,C]`` dense, ``[1,T,C]`` packed) through the blocks and the head;
        ``timesteps`` ``[N]``, one per modulation row of the layout (sample, sequence or latent frame). The
        CLIP tokens ``image_context`` (dense only) are embedded and put before the text tokens, as Wan does.
        With ``self.parallel`` set, this rank runs the blocks on its part and every rank gets the whole result."""
        if self.parallel is not None:
            return self.parallel.transformer(self._run_blocks, x, timesteps, context, layout, image_context)
        return self._run_blocks(x, timesteps, context, layout, image_context)

    def _run_blocks(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, layout: TokenLayout,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The body of ``_transformer`` on whatever tokens ``layout`` describes (all of them, or a rank's part)."""
        cfg = self.config
        dtype = self.patch_embedding.weight.dtype
        time_emb = self.time_embedding(sinusoidal_embedding(timesteps, cfg.freq_dim).to(dtype)).float()  # [N,C]
        time_mod = self.time_projection(time_emb.to(dtype)).float().unflatten(1, (6, cfg.dim))  # [N,6,C]
        ctx = self.text_embedding(context.to(dtype))  # [B,L,C] or [1,Tk,C]
        if image_context is not None:
            ctx = torch.cat([self.img_emb(image_context.to(dtype)), ctx], dim=1)  # [B,Li+L,C]
        blocks, cache = self.blocks, self.step_cache
        if cache is not None:  # step caching (step_cache.py): may run block 0 itself, or leave no block to run
            x, blocks = cache.before_blocks(x, time_emb, time_mod, self.blocks, (time_mod, ctx, layout))
        for block in blocks:
            x = block(x, time_mod, ctx, layout)  # like x
        if cache is not None:
            x = cache.after_blocks(x)  # a skipped step: the cached residual added
        return self.head(x, time_emb, layout)  # [.., pt*ph*pw*Cout]


# Published configs (Wan 2.1 `wan/configs/`, Wan 2.2 A14B (each of its two experts) and TI2V-5B) and the built-in
# tiny model's. Presets of equal shapes keep the 2.1 one first: detection of a single file names it.
DIT_PRESETS: dict[str, WanDiTConfig] = {
    "wan2.1-t2v-1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.2-t2v-a14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),  # shapes of 2.1's 14B
    "wan2.1-i2v-14b": WanDiTConfig(  # 480p and 720p alike
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v", clip_branch=True),
    "wan2.1-flf2v-14b": WanDiTConfig(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="flf2v", clip_branch=True),
    "wan2.2-i2v-a14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, model_type="i2v"),
    "wan2.2-ti2v-5b": WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48, model_type="ti2v"),
    "builtin-tiny": WanDiTConfig(
        dim=192, ffn_dim=512, freq_dim=64, text_dim=384, text_len=32, num_heads=3, num_layers=6
    ),
}
