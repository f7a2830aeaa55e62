"""The Wan DiT run on the Triton backend (kernels interpreted on CPU) equals the same DiT on the
reference backend: the model's calls match the kernels' contracts (shapes, strides, broadcast of the
modulation, RoPE layout, cross-attention lengths). On CUDA the same backend is what get_backend picks."""
import pytest
import torch

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.kernels.dispatch import TRITON
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig

# head dim 64 (a kernel size), odd patch grid, text shorter than the video
CONFIG = WanDiTConfig(dim=128, ffn_dim=160, freq_dim=32, text_dim=24, text_len=7, num_heads=2, num_layers=2)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_dit_on_triton_backend_matches_reference(monkeypatch):
    reference = WanDiT(CONFIG, REFERENCE)
    reference.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    fused = WanDiT(CONFIG, TRITON)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 2, 6, 10, generator=torch.Generator().manual_seed(1))  # 2 x 3 x 5 patches
    t, ctx = torch.tensor([900.0, 30.0]), torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(x, t, ctx)
        # from here on a fall-back to a reference would fail: every call must take the kernel
        import comfyui_spacetime.kernels.adaln as adaln_module
        import comfyui_spacetime.kernels.attention as attention_module
        import comfyui_spacetime.kernels.rmsnorm as rmsnorm_module

        def refuse(*args, **kwargs):
            raise AssertionError("the Triton backend fell back to a reference")

        import comfyui_spacetime.kernels.rms_norm_rope as rope_module

        for module, name in ((attention_module, "attention_ref"), (adaln_module, "layer_norm_modulate_ref"),
                             (adaln_module, "gated_residual_ref"), (rmsnorm_module, "rms_norm_ref"),
                             (rope_module, "rms_norm_rope_ref")):
            monkeypatch.setattr(module, name, refuse)
        actual = fused(x, t, ctx)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
