"""Latent previews: a cheap linear map from a latent to RGB, so every sampling step can show the video
forming without running the VAE.

``rgb = latent @ factors + bias`` per latent pixel, on the DiT's normalized latents (the space the sampler
works in, as ComfyUI's ``Latent2RGBPreviewer`` applies its factors), giving -1..1. Published factors: ComfyUI
``comfy/latent_formats.py``, ``Wan21.latent_rgb_factors`` / ``_bias`` (16 channels) and ``Wan22`` (48). The
built-in VAE's are fitted by least squares on its own latents (``fit_latent_rgb``) and stored in its file's
metadata (``META_LATENT_RGB``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

META_LATENT_RGB = "spacetime_latent_rgb"  # JSON {"factors": [[r, g, b] per channel], "bias": [r, g, b]}
PREVIEW_MODES = ("middle frame", "strip")
STRIP_FRAMES = 4  # frames side by side in a strip preview


@dataclass(frozen=True)
class LatentRGB:
    """``factors`` one (r, g, b) row per latent channel, ``bias`` (r, g, b)."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.factors)

    def to_json(self) -> str:
        return json.dumps({"factors": [list(row) for row in self.factors], "bias": list(self.bias)})

    @classmethod
    def from_json(cls, text: str) -> "LatentRGB":
        data = json.loads(text)
        return cls(tuple(tuple(float(v) for v in row) for row in data["factors"]), tuple(float(v) for v in data["bias"]))

    def to_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent frames ``[..., C, h, w]`` -> RGB ``[..., h, w, 3]`` in 0..1."""
        if latent.shape[-3] != self.channels:
            raise ValueError(f"a latent of {latent.shape[-3]} channels has no preview with a {self.channels}-channel map")
        factors = torch.tensor(self.factors, dtype=torch.float32, device=latent.device)  # [C,3]
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latent.device)  # [3]
        rgb = torch.einsum("...chw,cr->...hwr", latent.float(), factors) + bias  # -1..1
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


# ComfyUI comfy/latent_formats.py: Wan21 and Wan22 latent_rgb_factors / latent_rgb_factors_bias.
WAN21_RGB = LatentRGB((
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
), (-0.1835, -0.0868, -0.3360))
WAN22_RGB = LatentRGB((
    (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491), (-0.0813, -0.0677, 0.0607),
    (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912), (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025),
    (0.0443, -0.0102, 0.0288), (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637), (-0.0268, 0.0024, 0.0260),
    (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287), (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622),
    (-0.0086, -0.0374, -0.0051), (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447), (-0.0304, -0.0574, -0.0196),
    (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014), (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380),
    (0.0239, -0.0305, 0.0325), (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295), (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800), (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927),
    (-0.0145, 0.0041, 0.0015), (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
), (0.0317, -0.0878, -0.1388))
PUBLISHED_RGB = {"wan2.1": WAN21_RGB, "wan2.2": WAN22_RGB}  # by VAE preset


def fit_latent_rgb(latents: torch.Tensor, pixels: torch.Tensor) -> LatentRGB:
    """Least-squares ``pixels ~ latents @ factors + bias``: ``latents [N, C]`` normalized latent pixels,
    ``pixels [N, 3]`` the RGB (-1..1) they stand for (e.g. each latent pixel's block of the frame, averaged)."""
    if latents.ndim != 2 or pixels.shape != (latents.shape[0], 3):
        raise ValueError(f"latents must be [N, C] and pixels [N, 3], got {tuple(latents.shape)} and {tuple(pixels.shape)}")
    design = torch.cat([latents.double(), torch.ones(latents.shape[0], 1, dtype=torch.float64)], dim=1)  # [N,C+1]
    solution = torch.linalg.lstsq(design, pixels.double()).solution  # [C+1,3]
    rows = tuple(tuple(round(float(v), 5) for v in row) for row in solution[:-1])
    return LatentRGB(rows, tuple(round(float(v), 5) for v in solution[-1]))


def preview_image(x0: torch.Tensor, rgb: LatentRGB, mode: str = PREVIEW_MODES[0]) -> torch.Tensor:
    """The preview of the first video of a sample ``x0 [B, C, F, h, w]`` (normalized latents): its middle latent
    frame, or up to ``STRIP_FRAMES`` frames spread over the video side by side -> ``[h, w or k*w, 3]`` in 0..1."""
    if mode not in PREVIEW_MODES:
        raise ValueError(f"preview mode {mode!r} is not allowed; allowed values: {list(PREVIEW_MODES)}")
    frames = x0.shape[2]
    if mode == "middle frame":
        picks = [frames // 2]
    else:
        count = min(STRIP_FRAMES, frames)
        picks = sorted({round(i * (frames - 1) / max(count - 1, 1)) for i in range(count)})
    images = rgb.to_rgb(x0[0, :, picks].movedim(1, 0).detach().cpu())  # [k,h,w,3]
    return torch.cat(list(images), dim=1)  # [h, k*w, 3]
