"""Step caching (``model_defs/step_cache.py``): threshold 0, or a threshold that never skips, is bit-identical to
no cache (dense and packed sampling); a positive threshold skips evaluations and changes the result a bounded
amount; every run starts empty (two runs alike, the DiT caches nothing after a run, also one that raised; an expert
pair's low-noise expert starts afresh); LoRAs still apply; per-frame timesteps work; bad settings get one-line
errors; auto coefficients follow the model's preset."""
import logging
import math

import pytest
import torch

from comfyui_spacetime.jobs.packed import PackedItem, generate_packed
from comfyui_spacetime.jobs.text_to_video import generate, pair_experts
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.lora import LoraFile
from comfyui_spacetime.model_defs.step_cache import StepCacheSettings, cached, polynomial
from comfyui_spacetime.model_defs.step_cache_coefficients import COEFFICIENTS, PRESET_COEFFICIENTS
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT, WanDiTConfig
from comfyui_spacetime.nodes.step_cache import SpacetimeStepCache

CONFIG = WanDiTConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=24, text_len=8, num_heads=2, num_layers=3)
FORMAT = LatentFormat(16, (0.0,) * 16, (1.0,) * 16)
CPU = torch.device("cpu")
SETTINGS = SolverSettings(steps=10, cfg=4.0, shift=3.0)
LATENT = torch.zeros(1, 16, 2, 4, 6)
# on this random model, the published 1.3B polynomial estimates so little change that teacache skips every
# evaluation it may: a deterministic, heavy skip pattern for the tests below
SKIPPING = StepCacheSettings("teacache", 0.1, coefficients="wan2.1-t2v-1.3b")


def _model(seed: int = 0, name: str = "test.safetensors", preset=None) -> SpacetimeModel:
    dit = WanDiT(CONFIG, REFERENCE).eval().requires_grad_(False)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    return SpacetimeModel(dit, FORMAT, name, preset)


def _cond(seed: int) -> SpacetimeConditioning:
    emb = torch.randn(1, 8, 24, generator=torch.Generator().manual_seed(seed))
    return SpacetimeConditioning(EncodedText(emb, torch.ones(1, 8, dtype=torch.bool), ("p",), (False,)), "test")


class _Counts:
    """DiT evaluations seen by forward hooks: total (the head runs every time), computed (the last block runs)."""

    def __init__(self, *dits: WanDiT):
        self.total = self.computed = 0
        self.handles = []
        for dit in dits:
            self.handles.append(dit.head.register_forward_hook(lambda *a: self._add("total")))
            self.handles.append(dit.blocks[-1].register_forward_hook(lambda *a: self._add("computed")))

    def _add(self, which: str) -> None:
        setattr(self, which, getattr(self, which) + 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _generate(model: SpacetimeModel, settings: SolverSettings = SETTINGS, **kwargs) -> torch.Tensor:
    return generate(model, _cond(0), _cond(1), LATENT, 0, settings, CPU, **kwargs)


@pytest.mark.parametrize("method", ["teacache", "fbcache"])
def test_threshold_zero_and_a_threshold_that_never_skips_are_bit_identical(method):
    model = _model()
    base = _generate(model)
    off = StepCacheSettings(method, 0.0, coefficients="wan2.1-t2v-1.3b")
    assert torch.equal(_generate(model.with_step_cache(off)), base)
    # fbcache at a threshold no change is below: the hook runs every evaluation (block 0 itself), skips none
    with _Counts(model.dit) as counts:
        never = _generate(model.with_step_cache(StepCacheSettings("fbcache", 1e-9)))
    assert torch.equal(never, base) and counts.computed == counts.total == SETTINGS.steps


def test_packed_sampling_threshold_zero_is_bit_identical_and_a_threshold_skips():
    model = _model()
    items = [PackedItem(_cond(0), _cond(1), (1, 16, 2, 4, 6), 0, "a"), PackedItem(_cond(2), _cond(3), (1, 16, 1, 6, 2), 1, "b")]
    base = generate_packed(model, items, SETTINGS, CPU, 10_000)
    off = generate_packed(model.with_step_cache(StepCacheSettings("fbcache", 0.0)), items, SETTINGS, CPU, 10_000)
    assert all(torch.equal(a, b) for a, b in zip(base, off))
    with _Counts(model.dit) as counts:
        skipped = generate_packed(model.with_step_cache(SKIPPING), items, SETTINGS, CPU, 10_000)
    assert counts.total == SETTINGS.steps and 0 < counts.computed < counts.total
    assert all(0 < (a - b).norm() / b.norm() < 0.5 for a, b in zip(skipped, base))


@pytest.mark.parametrize("settings", [SKIPPING, StepCacheSettings("fbcache", 0.2, start=0.1),
                                      StepCacheSettings("magcache", 0.2, coefficients="wan2.1-t2v-1.3b")])
def test_a_positive_threshold_skips_evaluations_and_changes_the_result_a_bounded_amount(settings, caplog):
    model = _model()
    base = _generate(model)
    with caplog.at_level(logging.INFO), _Counts(model.dit) as counts:
        out = _generate(model.with_step_cache(settings))
    assert counts.total == SETTINGS.steps and 0 < counts.computed < counts.total
    first_cacheable = math.ceil(settings.start * SETTINGS.steps)
    assert counts.computed >= first_cacheable  # the steps before start are computed
    # measured: 0.28 (teacache, 9 of 10 reused), 0.011 (fbcache, 2 reused), 0.087 (magcache, 6 reused): well below 1
    change = float((out - base).norm() / base.norm())
    assert 0 < change < 0.5
    summary = [r.getMessage() for r in caplog.records if "step cache" in r.getMessage()]
    assert summary == [f"Spacetime step cache ({settings.resolve(None, 'x').describe()}): {counts.computed} of "
                       f"{counts.total} DiT evaluations computed, {counts.total - counts.computed} reused "
                       f"({counts.total / counts.computed:.2f}x fewer)"]


def test_every_run_starts_empty_and_the_dit_caches_nothing_after_it():
    model = _model().with_step_cache(SKIPPING)
    first, second = _generate(model), _generate(model)
    assert torch.equal(first, second) and model.dit.step_cache is None
    # a run interrupted mid-way leaves no cache behind, and the next run is as the first
    def stop(done, _total, _x0):
        assert model.dit.step_cache is not None
        if done == 5:
            raise KeyboardInterrupt("cancel")

    with pytest.raises(KeyboardInterrupt):
        _generate(model, on_step=stop)
    assert model.dit.step_cache is None and torch.equal(_generate(model), first)
    # the same DiT sampled alone while a run caches it is refused, not mixed into that run's state
    with cached(model.dit, SKIPPING, 4), pytest.raises(RuntimeError, match="already caching"):
        with cached(model.dit, SKIPPING, 4):
            pass


def test_an_expert_pair_caches_each_expert_from_an_empty_state():
    high, low = _model(0, "wan2.2_t2v_high_noise_14B.safetensors"), _model(1, "wan2.2_t2v_low_noise_14B.safetensors")
    pair = pair_experts(high, low, switch_step=5).with_step_cache(SKIPPING)
    assert pair.step_cache is not None and pair.low_noise.step_cache is not None
    with _Counts(high.dit) as high_counts, _Counts(low.dit) as low_counts:
        out = _generate(pair)
    # step 5 is the low-noise expert's first: computed, never its high-noise partner's residual
    assert high_counts.total == 5 and low_counts.total == 5
    assert 1 <= high_counts.computed < 5 and 1 <= low_counts.computed < 5
    base = _generate(pair_experts(high, low, switch_step=5))
    assert 0 < float((out - base).norm() / base.norm()) < 0.5
    # cached before pairing: only that expert caches
    only_high = pair_experts(high.with_step_cache(SKIPPING), low, switch_step=5)
    with _Counts(low.dit) as low_counts:
        _generate(only_high)
    assert low_counts.computed == low_counts.total == 5


def test_a_lora_applies_to_the_computed_steps_of_a_cached_model():
    model = _model()
    delta = {"diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, CONFIG.dim, generator=torch.Generator().manual_seed(5)),
             "diffusion_model.head.head.diff_b": torch.full((64,), 0.3)}
    lora = LoraFile("l.safetensors", delta, {})
    with_lora = model.with_lora(lora, 1.0)
    assert torch.equal(_generate(with_lora.with_step_cache(StepCacheSettings("teacache", 0.0, coefficients="wan2.1-t2v-1.3b"))),
                       _generate(with_lora))
    # either order of the two nodes is one model
    a = _generate(with_lora.with_step_cache(SKIPPING))
    b = _generate(model.with_step_cache(SKIPPING).with_lora(lora, 1.0))
    assert torch.equal(a, b)
    assert float((a - _generate(model.with_step_cache(SKIPPING))).abs().max()) > 1e-3  # the LoRA is applied


def test_per_frame_timesteps_are_cached_per_row():
    dit = _model().dit
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(1))
    steps = [torch.tensor([[0.0, 800.0, 800.0]] * 2), torch.tensor([[0.0, 790.0, 790.0]] * 2)]
    with torch.no_grad():
        full = [dit(latents, t, context) for t in steps]
        with cached(dit, StepCacheSettings("fbcache", 0.5, start=0.0), 2) as run:
            for index, t in enumerate(steps):
                run.at_step(index)
                out = dit(latents, t, context)
    assert run.computed == 1 and run.reused == 1  # a 1% timestep change: the second evaluation reuses
    assert 0 < float((out - full[1]).norm() / full[1].norm()) < 0.1


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": -0.1}, r"threshold=-0.1 is not allowed: it must be a finite number from 0 \(off\) to 1.0"),
    ({"threshold": float("nan")}, r"threshold=nan is not allowed"),
    ({"threshold": 1.5}, r"threshold=1.5 is not allowed"),
    ({"method": "magic"}, r"method='magic' is not allowed; allowed values: \['teacache', 'magcache', 'fbcache'\]"),
    ({"start": 0.5, "end": 0.5}, r"start=0.5 and end=0.5 are not allowed: start must be below end"),
    ({"end": 0.0}, r"end=0.0 is not allowed: it must be a finite number in \(0, 1\]"),
    ({"coefficients": "wan9"}, r"coefficients='wan9' is not allowed for method 'teacache'; allowed values: \['auto', 'wan2.1-t2v-1.3b'"),
    ({"method": "magcache", "coefficients": "wan2.1-t2v-1.3b-embedding"}, r"not allowed for method 'magcache'; allowed values: \['auto', 'wan2.1-t2v-1.3b', 'wan2.1-t2v-14b', 'wan2.1-i2v-14b-480p'"),
])
def test_bad_settings_get_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        StepCacheSettings(**kwargs)
    assert "\n" not in str(error.value)


def test_node_validates_its_inputs_in_one_line_and_applies_the_cache():
    good = dict(method="teacache", threshold=0.1, start=0.2, end=1.0, coefficients="auto")
    assert SpacetimeStepCache.VALIDATE_INPUTS(**good) is True
    for bad, expected in [({"threshold": -1.0}, "threshold: -1.0 is out of range; allowed: 0.0 to 1.0"),
                          ({"threshold": float("nan")}, "threshold: nan is not a finite number"),
                          ({"method": "x"}, "method: value 'x' is not allowed"),
                          ({"start": 0.9, "end": 0.5}, "start=0.9 and end=0.5 are not allowed")]:
        problem = SpacetimeStepCache.VALIDATE_INPUTS(**{**good, **bad})
        assert isinstance(problem, str) and problem.startswith(expected) and "\n" not in problem
    (model,) = SpacetimeStepCache().apply(_model(preset="builtin-tiny"), **good)
    assert model.step_cache == StepCacheSettings("teacache", 0.1, 0.2, 1.0, "builtin-tiny")


def test_magcache_skips_at_most_k_in_a_row_by_the_interpolated_ratios():
    from comfyui_spacetime.model_defs.step_cache import MAGCACHE_MAX_SKIPS, StepCacheRun
    from comfyui_spacetime.model_defs.step_cache_coefficients import MAG_RATIOS, ratios_for_steps

    ratios = MAG_RATIOS["wan2.1-t2v-1.3b"].ratios  # 50 calibrated steps
    assert ratios_for_steps(ratios, 50) == ratios and ratios_for_steps(ratios, 1) == (ratios[-1],)
    assert ratios_for_steps(ratios, 4) == (ratios[0], ratios[16], ratios[33], ratios[49])  # MagCache's nearest_interp
    run = StepCacheRun(StepCacheSettings("magcache", 1.0, start=0.0, coefficients="wan2.1-t2v-1.3b"), 12)
    pattern = []
    for step in range(12):
        run.at_step(step)
        x = torch.ones(1, 2, 3)
        _, left = run.before_blocks(x, None, None, ["block"], ())
        pattern.append(bool(left))
        run.after_blocks(x)
    # a generous threshold: only K limits the skips; step 0 has nothing to reuse
    assert pattern == [True] + [False] * MAGCACHE_MAX_SKIPS + [True] + [False] * MAGCACHE_MAX_SKIPS + [True] + [False] * 2 + [True] + [False] * 2


def test_auto_coefficients_follow_the_preset_and_a_model_without_any_gets_one_line():
    for preset, name in [("wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b"), ("wan2.1-t2v-14b", "wan2.1-t2v-14b"),
                         ("wan2.1-i2v-14b", "wan2.1-i2v-14b-480p"), ("builtin-tiny", "builtin-tiny")]:
        assert preset in DIT_PRESETS and PRESET_COEFFICIENTS[preset] in COEFFICIENTS
        assert StepCacheSettings("teacache", 0.1).resolve(preset, "m").coefficients == name
    assert StepCacheSettings("magcache", 0.1).resolve("wan2.1-i2v-14b", "m").coefficients == "wan2.1-i2v-14b-480p"
    assert StepCacheSettings("magcache", 0.1).resolve("builtin-tiny", "m").coefficients == "builtin-tiny"
    with pytest.raises(ValueError, match=r"no teacache coefficients for model ti2v.safetensors \(wan2.2-ti2v-5b\); choose") as error:
        _model(name="ti2v.safetensors", preset="wan2.2-ti2v-5b").with_step_cache(StepCacheSettings("teacache", 0.1))
    assert "\n" not in str(error.value)
    assert _model(preset="wan2.2-ti2v-5b").with_step_cache(StepCacheSettings("fbcache", 0.1)).step_cache.method == "fbcache"
    assert polynomial((2.0, -1.0, 0.5), 3.0) == 2.0 * 9 - 3.0 + 0.5  # highest power first, as numpy.poly1d


def test_long_video_caches_each_chunk_as_its_own_run(tiny_model, tiny_vae, caplog):
    """Each chunk of a chain is a sampling run: its own empty cache and its own summary line (the built-in model's set)."""
    from comfyui_spacetime.jobs.long_video import generate_long_video, plan_long_video
    from comfyui_spacetime.jobs.prompt_schedule import single_prompt

    model = tiny_model.with_step_cache(StepCacheSettings("teacache", 0.3, start=0.1))
    assert model.step_cache.coefficients == "builtin-tiny"
    plan = plan_long_video(tiny_vae.video_rules, 32, 32, 9, 5, 1, mode="latent chain")
    settings = SolverSettings(steps=8, cfg=3.0, shift=5.0)
    emb = torch.randn(1, 4, model.config.text_dim, generator=torch.Generator().manual_seed(0))
    text = SpacetimeConditioning(EncodedText(emb, torch.ones(1, 4, dtype=torch.bool), ("p",), (False,)), "test")
    args = (tiny_vae, single_prompt(text), text, plan, 0, settings, 1.0, CPU, CPU)
    with caplog.at_level(logging.INFO), _Counts(model.dit) as counts:
        video = generate_long_video(model, *args)
    summaries = [r.getMessage() for r in caplog.records if "step cache" in r.getMessage()]
    assert plan.chunks == 2 and len(summaries) == 2 and counts.total == 2 * settings.steps
    assert 0 < counts.computed < counts.total and summaries[0] == summaries[1]  # same schedule: same skips per chunk
    assert torch.equal(generate_long_video(model, *args), video) and model.dit.step_cache is None
    windows = plan_long_video(tiny_vae.video_rules, 32, 32, 9, 5, 1)  # the default mode: one run over the whole latent
    caplog.clear()
    with caplog.at_level(logging.INFO):
        generate_long_video(model, tiny_vae, single_prompt(text), text, windows, 0, settings, 1.0, CPU, CPU)
    assert windows.mode == "context windows" and len([r for r in caplog.records if "step cache" in r.getMessage()]) == 1
