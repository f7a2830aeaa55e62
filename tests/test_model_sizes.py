"""The size rules: one module of integers that every size check and message of the pack asks."""
import pytest

from comfyui_spacetime.model_defs.bundles import any_vae_rules
from comfyui_spacetime.model_defs.sizes import SizeRules, describe_allowed, nearest_allowed, patch_grid

WAN21 = SizeRules(8, 4, (1, 2, 2))
WAN22 = SizeRules(16, 4, (1, 2, 2))  # Wan 2.2's 16x16x4 VAE under the same 2x2-patch DiT


@pytest.mark.parametrize("value, first, step, nearest", [
    (0, 1, 4, [1]), (1, 1, 4, [1]), (4, 1, 4, [1, 5]), (17, 1, 4, [17]), (18, 1, 4, [17, 21]),
    (8, 16, 16, [16]), (72, 16, 16, [64, 80]), (5, 4, 4, [4, 8]),
])
def test_nearest_allowed(value, first, step, nearest):
    assert nearest_allowed(value, first, step) == nearest


def test_describe_allowed_can_stop_below_a_bound():
    assert describe_allowed(6, 4, 4) == "allowed: 4, 8, 12, ... (nearest: 4, 8)"
    assert describe_allowed(17, 1, 4, below=17) == "allowed: 1, 5, 9, ... below 17 (nearest: 13)"


def test_rules_follow_the_vae_factors_and_the_patch():
    assert (WAN21.width_unit, WAN22.width_unit) == (16, 32)
    assert WAN21.latent_size(96, 64, 17) == (5, 8, 12)
    assert WAN22.latent_size(96, 64, 17) == (5, 4, 6)
    WAN21.check_size(48, 48, 1)
    with pytest.raises(ValueError, match=r"width=48 is not allowed: it must be a multiple of 32 \(VAE factor x patch size\); nearest allowed values: \[32, 64\]"):
        WAN22.check_size(48, 64, 17)
    with pytest.raises(ValueError, match=r"width=12 is not allowed: it must be a multiple of 8 \(the VAE's spatial factor\)"):
        SizeRules(8, 4).check_size(12, 8, 1)


def test_patch_grid_names_the_sides_and_the_patch():
    assert patch_grid((1, 16, 5, 8, 12), (1, 2, 2)) == (5, 4, 6)
    with pytest.raises(ValueError, match=r"latent size 5x8x13 \(frames x height x width\) is not a multiple of the patch \(1, 2, 2\)"):
        patch_grid((5, 8, 13), (1, 2, 2))


def test_validation_rules_are_the_loosest_supported_family():
    rules = any_vae_rules()
    assert (rules.width_unit, rules.temporal_factor) == (16, 4)  # Wan 2.1 and the built-in model
