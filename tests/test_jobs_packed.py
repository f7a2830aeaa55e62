"""Patch n' pack: the packed DiT forward and packed sampling equal running each video alone; the packed
path goes through the backend's varlen attention; budgets split packs; bad lists get clear errors."""
import dataclasses
import logging
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel, SpacetimeTextEncoder
from comfyui_spacetime.jobs.packed import PackedItem, generate_packed, plan_packs
from comfyui_spacetime.model_defs.layers import patchify, unpatchify
from comfyui_spacetime.jobs.text_to_video import generate, step_preview
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.jobs.video_list import parse_video_list
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.nodes.packed import SpacetimePackedSampler
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.sizes import SizeRules

CONFIG = WanDiTConfig(dim=128, ffn_dim=256, freq_dim=64, text_dim=48, text_len=16, num_heads=2, num_layers=2)
CPU = torch.device("cpu")
VIDEO_RULES = SizeRules(8, 4, (1, 2, 2))  # the built-in and Wan 2.1 VAE under a 2x2-patch DiT
# odd sizes, a 1-latent-frame video among them: [C, F, H, W] latents (patch 1x2x2)
SHAPES = [(16, 3, 4, 6), (16, 1, 6, 2), (16, 2, 2, 10)]


def _dit(backend=REFERENCE) -> WanDiT:
    torch.manual_seed(0)
    dit = WanDiT(CONFIG, backend)
    dit.init_weights(torch.Generator().manual_seed(0), zero_head=False)  # a random head: outputs depend on inputs
    return dit.eval()


def _model(backend=REFERENCE) -> SpacetimeModel:
    stats = torch.Generator().manual_seed(1)
    mean = tuple(torch.randn(16, generator=stats).tolist())
    std = tuple((torch.rand(16, generator=stats) + 0.5).tolist())
    return SpacetimeModel(_dit(backend), LatentFormat(16, mean, std), "test-tiny")


def _cond(prompt: str, tokens: int) -> SpacetimeConditioning:
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    embeddings = torch.zeros(1, CONFIG.text_len + 4, CONFIG.text_dim)  # longer than text_len: cut, as generate cuts
    embeddings[:, :tokens] = torch.randn(1, tokens, CONFIG.text_dim, generator=generator)
    mask = torch.zeros(1, embeddings.shape[1], dtype=torch.bool)
    mask[:, :tokens] = True
    return SpacetimeConditioning(EncodedText(embeddings, mask, (prompt,), (False,)), "test-encoder")


class _Recorder:
    """A varlen attention that records its calls and runs the reference."""

    def __init__(self):
        self.calls = []
        self.rotations = []  # rows of the RoPE table of each q/k rotation

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.calls.append(SimpleNamespace(cu_q=cu_seqlens_q.tolist(), cu_k=cu_seqlens_k.tolist(), q=tuple(q.shape)))
        return REFERENCE.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    def rotate(self, x, weight, cos, sin, eps):
        self.rotations.append((tuple(x.shape), cos.shape[0]))
        return REFERENCE.rms_norm_rope(x, weight, cos, sin, eps)


def _recording_backend():
    def dense_attention(*args, **kwargs):
        raise AssertionError("the packed path must not call the dense attention")

    recorder = _Recorder()
    backend = dataclasses.replace(
        REFERENCE, name="recording", attention=dense_attention, attention_varlen=recorder, rms_norm_rope=recorder.rotate
    )
    return backend, recorder


def test_patchify_round_trip():
    latent = torch.randn(16, 3, 4, 6)
    tokens = patchify(latent, (1, 2, 2))
    assert tokens.shape == (3 * 2 * 3, 64)
    assert torch.equal(unpatchify(tokens, (3, 2, 3), (1, 2, 2)), latent)


def test_packed_forward_equals_forward_of_each_video():
    dit = _dit()
    generator = torch.Generator().manual_seed(2)
    latents = [torch.randn(shape, generator=generator) for shape in SHAPES]
    timesteps = torch.tensor([999.0, 420.5, 3.0])
    contexts = torch.randn(3, CONFIG.text_len, CONFIG.text_dim, generator=generator)
    with torch.inference_mode():
        packed = dit.forward_videos(latents, timesteps, contexts)
        for i, latent in enumerate(latents):
            alone = dit(latent[None], timesteps[i : i + 1], contexts[i : i + 1])[0]
            assert packed[i].shape == alone.shape == latent.shape
            assert (packed[i] - alone).abs().max() <= 1e-5
            assert alone.abs().max() > 0.1  # a real prediction, not zeros on both sides


def test_packed_forward_runs_one_varlen_attention_per_layer_for_all_videos():
    backend, recorder = _recording_backend()
    latents = [torch.randn(shape) for shape in SHAPES]
    with torch.inference_mode():
        _dit(backend).forward_videos(latents, torch.tensor([900.0, 500.0, 10.0]), torch.randn(3, CONFIG.text_len, CONFIG.text_dim))
    video_bounds = [0, 18, 21, 31]  # 3*2*3, 1*3*1, 2*1*5 patches
    text_bounds = [0, 16, 32, 48]
    assert len(recorder.calls) == 2 * CONFIG.num_layers  # self- and cross-attention of each block, every video at once
    for self_call, cross_call in zip(recorder.calls[::2], recorder.calls[1::2]):
        assert self_call.cu_q == self_call.cu_k == video_bounds and self_call.q == (31, 2, 64)
        assert cross_call.cu_q == video_bounds and cross_call.cu_k == text_bounds
    # q and k of each self-attention rotated once, with one table row per packed token; cross-attention never
    assert recorder.rotations == [((1, 31, 128), 31)] * (2 * CONFIG.num_layers)


def test_packed_forward_on_the_triton_kernels_equals_the_reference_model(monkeypatch):
    """The packed calls meet the kernels' contracts (varlen with per-token RoPE, per-token modulation):
    interpreted on CPU, no call may fall back to a reference."""
    import triton  # noqa: F401 - a missing Triton must fail this test, not skip it

    import comfyui_spacetime.kernels.adaln as adaln_module
    import comfyui_spacetime.kernels.attention_varlen as varlen_module
    import comfyui_spacetime.kernels.rmsnorm as rmsnorm_module
    from comfyui_spacetime.kernels.dispatch import TRITON

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reference = _dit()
    fused = WanDiT(CONFIG, TRITON)
    fused.load_state_dict(reference.state_dict())
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(3)) for shape in SHAPES]
    timesteps = torch.tensor([900.0, 400.0, 5.0])
    contexts = torch.randn(3, CONFIG.text_len, CONFIG.text_dim, generator=torch.Generator().manual_seed(4))

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton backend fell back to a reference")

    with torch.inference_mode():
        expected = [reference(latent[None], timesteps[i : i + 1], contexts[i : i + 1])[0] for i, latent in enumerate(latents)]
        for module, name in ((varlen_module, "attention_varlen_ref"), (adaln_module, "layer_norm_modulate_ref"),
                             (adaln_module, "gated_residual_ref"), (rmsnorm_module, "rms_norm_ref")):
            monkeypatch.setattr(module, name, refuse)
        packed = fused.forward_videos(latents, timesteps, contexts)
    for got, want in zip(packed, expected):
        assert (got - want).abs().max() <= 1e-5


def _items(shapes=SHAPES, seed=7):
    return [
        PackedItem(_cond(f"prompt {i}", 5 + 3 * i), _cond("negative", 4), (1, *shape), seed + i, f"item {i}")
        for i, shape in enumerate(shapes)
    ]


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.mark.parametrize("scheduler, cfg", [("euler", 4.0), ("unipc", 4.0), ("unipc", 1.0), ("lcm", 1.0), ("euler_distill", 1.0)])
def test_packed_sampling_equals_generate_alone(model, scheduler, cfg):
    items = _items()
    packed = generate_packed(model, items, SolverSettings(3, cfg, 3.0, scheduler), CPU, max_tokens=10_000)
    for item, latent in zip(items, packed):
        alone = generate(model, item.positive, item.negative, torch.zeros(item.latent_shape), item.seed, SolverSettings(3, cfg, 3.0, scheduler, 1.0), CPU)
        assert latent.shape == alone.shape == item.latent_shape
        assert (latent - alone).abs().max() <= 1e-4


def test_packed_sampling_is_one_pack_of_positives_and_negatives_per_step():
    backend, recorder = _recording_backend()
    generate_packed(_model(backend), _items(), SolverSettings(2, 4.0, 3.0, "euler"), CPU, max_tokens=10_000)
    assert len(recorder.calls) == 2 * 2 * CONFIG.num_layers  # steps x (self + cross) x layers
    assert all(call.cu_q == [0, 18, 21, 31, 49, 52, 62] for call in recorder.calls)  # 3 positives, then 3 negatives


def test_over_budget_splits_into_packs_with_the_same_results(model, caplog):
    items = _items()
    one_pack = generate_packed(model, items, SolverSettings(2, 4.0, 3.0, "unipc"), CPU, max_tokens=62)
    with caplog.at_level(logging.INFO):
        split = generate_packed(model, items, SolverSettings(2, 4.0, 3.0, "unipc"), CPU, max_tokens=40)  # 36 + 6 + 20 tokens with cfg: [36], [6, 20]
    assert [r.message for r in caplog.records if "packs" in r.message] == [
        "Spacetime: 3 videos need 62 tokens with cfg (positive + negative), more than max_tokens_per_pack=40; sampling them in 2 packs"
    ]
    for a, b in zip(one_pack, split):
        assert (a - b).abs().max() <= 1e-5


def test_progress_shows_each_packs_first_video_as_generate_previews_it_alone():
    """Live previews while packing: every step's preview is the step estimate of the pack's first video, the image
    ``generate`` would show for that video sampled alone; over two packs, each pack's own first video."""
    from comfyui_spacetime.model_defs.previews import PUBLISHED_RGB

    model = dataclasses.replace(_model(), latent_format=dataclasses.replace(_model().latent_format, rgb=PUBLISHED_RGB["wan2.1"]))
    items = _items()
    seen = []
    generate_packed(model, items, SolverSettings(2, 4.0, 3.0, "euler"), CPU, max_tokens=40,  # packs [0], [1, 2]
                    on_progress=lambda done, total, preview: seen.append((done, total, preview())))
    assert [(done, total) for done, total, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for (_, _, image), first in zip(seen, [0, 0, 1, 1]):
        item = items[first]
        alone = []
        generate(model, item.positive, item.negative, torch.zeros(item.latent_shape), item.seed,
                 SolverSettings(2, 4.0, 3.0, "euler"), CPU, on_step=lambda done, total, x0: alone.append(x0))
        expected = [step_preview(model, x0)() for x0 in alone]
        assert any((image - e).abs().max() <= 1e-4 for e in expected) and image.shape == expected[0].shape


def test_plan_packs_is_first_fit_in_order():
    assert plan_packs([50, 40, 20, 30, 10], 60, list("abcde")) == [[0, 4], [1, 2], [3]]
    assert plan_packs([5, 5], 10, ["a", "b"]) == [[0, 1]]


def test_a_single_video_over_the_budget_is_an_error_naming_it(model):
    with pytest.raises(ValueError, match=r"the video on item 0 needs 36 tokens \(counted twice with cfg != 1.*\), more than max_tokens_per_pack=35; raise max_tokens_per_pack"):
        generate_packed(model, _items(), SolverSettings(2, 4.0, 3.0, "euler"), CPU, max_tokens=35)


def test_video_list_parses_sizes_comments_and_prompts_with_bars():
    text = "# my list\n a red circle | 64 | 64 | 17\n\nA | B: a choice | 96|32|1\n"
    requests = parse_video_list(text, VIDEO_RULES)
    assert [(r.prompt, r.width, r.height, r.frames, r.line) for r in requests] == [
        ("a red circle", 64, 64, 17, 2), ("A | B: a choice", 96, 32, 1, 4)
    ]
    assert requests[1].name == "line 4 (96x32x1)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("ok | 64 | 64 | 17\na blue square | 64 | 64", r"line 2: expected 'prompt \| width \| height \| frames' \(4 fields separated by '\|'\), got 3 field\(s\): 'a blue square \| 64 \| 64'"),
        ("a | 64 | wide | 17", r"line 1: height 'wide' is not a whole number"),
        ("\n\na | 72 | 64 | 17", r"line 3: width=72 is not allowed: it must be a multiple of 16 \(VAE factor x patch size\); nearest allowed values: \[64, 80\]"),
        ("a | 64 | 64 | 16", r"line 1: frames=16 is not allowed: it must be 1 \+ 4\*k .*nearest allowed values: \[13, 17\]"),
        (" | 64 | 64 | 17", r"line 1: the prompt is empty"),
        ("# nothing here\n\n", r"the video list is empty; write one video per line as 'prompt \| width \| height \| frames'"),
    ],
)
def test_bad_video_lines_are_named_by_line_number(text, message):
    with pytest.raises(ValueError, match=message):
        parse_video_list(text, VIDEO_RULES)


class _HashEncoder:
    """A stand-in text encoder: embeddings drawn from the prompt's hash (no model files needed)."""

    model = nn.Identity()

    def encode(self, prompts, text_len):
        cond = _cond(prompts[0], 6)
        return cond.text


_VAE = SimpleNamespace(spatial_factor=8, temporal_factor=4, latent_channels=16, video_rules=VIDEO_RULES)


def _node_inputs(model, **overrides):
    inputs = dict(
        model=model, vae=_VAE, text_encoder=SpacetimeTextEncoder(_HashEncoder(), "test-encoder", CONFIG.text_dim, CONFIG.text_len),
        videos="a red circle | 48 | 32 | 9\n# skipped\na blue square | 16 | 80 | 1", negative="blurry", seed=11, steps=2,
        cfg=3.0, shift=3.0, scheduler="euler", max_tokens_per_pack=65536,
    )
    return {**inputs, **overrides}


def test_node_returns_one_latent_per_line_each_as_sampled_alone(model):
    (latents,) = SpacetimePackedSampler().sample(**_node_inputs(model))
    assert SpacetimePackedSampler.OUTPUT_IS_LIST == (True,)
    assert [l["samples"].shape for l in latents] == [(1, 16, 3, 4, 6), (1, 16, 1, 10, 2)]
    for index, (prompt, latent) in enumerate(zip(["a red circle", "a blue square"], latents)):
        alone = generate(model, _cond(prompt, 6), _cond("blurry", 6), torch.zeros(latent["samples"].shape), 11 + index, SolverSettings(2, 3.0, 3.0, "euler"), CPU)
        assert (latent["samples"] - alone).abs().max() <= 1e-4


def test_node_names_the_line_of_a_bad_video_and_of_one_over_budget(model):
    with pytest.raises(ValueError, match=r"line 3: height=40 is not allowed"):
        SpacetimePackedSampler().sample(**_node_inputs(model, videos="a | 16 | 16 | 1\n\nb | 16 | 40 | 1"))
    with pytest.raises(ValueError, match=r"the video on line 1 \(48x32x9\) needs 36 tokens .*more than max_tokens_per_pack=20"):
        SpacetimePackedSampler().sample(**_node_inputs(model, max_tokens_per_pack=20))
