"""How a long video keeps its look: a latent chain's chunk replays the chunk before's path on the frames they share
(``ChainGuide``), and every window or chunk has its background's latent colour held to its prompt's (``LookAnchor``):
per evaluation, per prompt (a schedule's later prompt gets its own look), never inside a prompt's own anchor span,
and not at all at strength 0 or with one span; the bad values of ``look_anchor``; and on the built-in model that
the anchor pulls a context-windows run's frames together where the free run lets them spread."""
import math

import pytest
import torch

from comfyui_spacetime.jobs.long_video import check_look_anchor
from comfyui_spacetime.model_defs.flow_matching import NUM_TRAIN_TIMESTEPS, SolverSettings, sample
from comfyui_spacetime.model_defs.long_sampling import ChainGuide, LookAnchor, anchor_spans, look_of
from comfyui_spacetime.nodes.long_video import SpacetimeLongVideo
from test_jobs_long_video import _text


def _velocity(seed: int):
    """A deterministic stand-in velocity that depends on x (so replayed inputs matter)."""
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))

    def velocity(x, t):
        return torch.einsum("cd,bdfhw->bcfhw", weight, x) * 0.3 + t.view(-1, 1, 1, 1, 1) / NUM_TRAIN_TIMESTEPS

    return velocity


def test_a_chunk_replays_the_shared_frames_path_of_the_chunk_before():
    sigmas = SolverSettings(6, 1.0, 3.0, "unipc").sigmas()
    first, second = ChainGuide(kept=2), None
    noise = torch.randn(1, 4, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    before = sample(_velocity(1), torch.zeros_like(noise), noise, sigmas, "unipc", guide=first)
    assert len(first.recorded) == 6  # one (input, velocity) pair per evaluation
    seen = []

    def spy(x, t):
        seen.append(x[:, :, :2].clone())
        return _velocity(2)(x, t)

    second = ChainGuide(kept=2, replay=first.recorded)
    after = sample(spy, torch.zeros_like(noise), torch.randn_like(noise), sigmas, "unipc", guide=second)
    for (inputs, _), shared in zip(first.recorded, seen):  # every evaluation sees the shared frames as the chunk before did
        torch.testing.assert_close(shared, inputs, rtol=0, atol=0)
    torch.testing.assert_close(after[:, :, :2], before[:, :, 3:], rtol=0, atol=1e-5)  # and ends them where it did
    free = sample(_velocity(2), torch.zeros_like(noise), torch.randn_like(noise), sigmas, "unipc", guide=ChainGuide(2, first.recorded, 0.0))
    assert (free[:, :, :2] - before[:, :, 3:]).abs().max() > 0.1  # strength 0 replays nothing

    short = ChainGuide(kept=2, replay=first.recorded[:3])
    with pytest.raises(RuntimeError, match=r"latent chain: model evaluation 4 of a chunk has no counterpart in the chunk before, which made 3"):
        sample(_velocity(2), torch.zeros_like(noise), noise, sigmas, "unipc", guide=short)


def _spread_x0(frames: int, shifts: torch.Tensor):
    """``(x, v, sigma)`` whose data prediction's frames are one pattern plus a per-frame, per-channel offset ``shifts``
    ``[C, frames]``."""
    pattern = torch.randn(1, 4, 1, 6, 6, generator=torch.Generator().manual_seed(3)).expand(1, 4, frames, 6, 6)
    x0 = pattern + shifts.view(1, 4, frames, 1, 1)
    x, sigma = torch.randn(1, 4, frames, 6, 6, generator=torch.Generator().manual_seed(4)), 0.6
    return x, (x - x0) / sigma, sigma


def test_windows_are_held_to_the_look_of_their_prompts_anchor_window():
    spans = [(0, 4), (2, 6), (4, 8)]
    shifts = torch.zeros(4, 8)
    shifts[:, 4:] = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1)  # a wash from frame 4 on
    x, v, sigma = _spread_x0(8, shifts)
    t = torch.full((1,), sigma * NUM_TRAIN_TIMESTEPS)
    one_prompt = torch.ones(1, 8)
    reference = look_of(x - sigma * v)[:, :, :4].median(dim=-1).values  # the first window's look
    for strength in (1.0, 0.5):
        moved = LookAnchor(strength, spans, one_prompt).windows(lambda x_, t_: v)(x, t)
        looks = look_of(x - sigma * moved)
        torch.testing.assert_close(looks[:, :, :4], look_of(x - sigma * v)[:, :, :4])  # the anchor window is its own look
        expected = look_of(x - sigma * v)[:, :, 4:] + strength * (reference[:, :, None] - look_of(x - sigma * v)[:, :, 4:])
        torch.testing.assert_close(looks[:, :, 4:], expected, rtol=0, atol=1e-5)
    plain = lambda x_, t_: v  # noqa: E731
    assert LookAnchor(0.0, spans, one_prompt).windows(plain) is plain
    assert LookAnchor(1.0, [(0, 8)], one_prompt).windows(plain) is plain  # one window: exactly the plain sampler

    # a schedule: frames 5.. are the second prompt's, anchored to its own first window (the last), so they keep the wash
    two_prompts = torch.tensor([[1.0] * 5 + [0.0] * 3, [0.0] * 5 + [1.0] * 3])
    assert anchor_spans(spans, two_prompts) == [0, 2]
    moved = LookAnchor(1.0, spans, two_prompts).windows(plain)(x, t)
    looks = look_of(x - sigma * moved)
    torch.testing.assert_close(looks[:, :, 4], reference, rtol=0, atol=1e-5)  # frame 4: the first prompt's look
    torch.testing.assert_close(looks[:, :, 5:], look_of(x - sigma * v)[:, :, 5:], rtol=0, atol=1e-6)  # in its own anchor span


def test_chain_chunks_are_held_to_the_recorded_look_of_the_first_chunk_evaluation_by_evaluation():
    spans = [(0, 4), (3, 7)]
    anchor = LookAnchor(1.0, spans, torch.ones(1, 7))
    shifts = torch.zeros(4, 4)
    x, v, sigma = _spread_x0(4, shifts)
    t = torch.full((1,), sigma * NUM_TRAIN_TIMESTEPS)
    first = anchor.chunk(0, 0)(lambda x_, t_: v)
    torch.testing.assert_close(first(x, t), v)  # the anchor chunk moves nothing and records its look
    torch.testing.assert_close(first(x, t * 0.5), v)
    assert len(anchor.recorded[0]) == 2
    recorded = anchor.recorded[0][0]
    washed_x, washed_v, _ = _spread_x0(4, torch.full((4, 4), 2.0))
    second = anchor.chunk(1, 3)(lambda x_, t_: washed_v)
    looks = look_of(washed_x - sigma * second(washed_x, t))
    torch.testing.assert_close(looks[:, :, 1:], recorded[:, :, None].expand(-1, -1, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(looks[:, :, :1], look_of(washed_x - sigma * washed_v)[:, :, :1])  # frame 3 is in the anchor chunk


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, True, "0.5"])
def test_bad_look_anchor_names_the_input_and_the_allowed_values(value):
    with pytest.raises(ValueError, match=r"look_anchor=.* is not allowed: it must be between 0 \(off\) and 1 \(default 0.5\)"):
        check_look_anchor(value)


def test_the_node_refuses_a_look_anchor_out_of_range_before_any_work():
    problem = SpacetimeLongVideo.VALIDATE_INPUTS(look_anchor=2.0)
    assert isinstance(problem, str) and problem.startswith("look_anchor:") and "1.0" in problem


def test_the_anchor_pulls_a_windows_runs_frames_together(tiny_model, tiny_vae, monkeypatch):
    """On the built-in model: the final latent's per-frame looks spread less around the first window's with the
    anchor than without (same seed; 57 frames, 4 windows)."""
    from comfyui_spacetime.jobs import long_video

    latents = []
    real = long_video.decode_frames
    monkeypatch.setattr(long_video, "decode_frames", lambda vae, latent, device: latents.append(latent) or real(vae, latent, device))
    spread = {}
    for strength in (0.0, 1.0):
        SpacetimeLongVideo().generate(tiny_model, tiny_vae, _text(0), _text(1), 64, 64, 57, 17, 5, 11, 3, 5.0, 5.0, "unipc",
                                      1.0, "context windows", None, strength)
        looks = look_of(latents[-1])  # [1,C,15]
        spread[strength] = float((looks[:, :, 5:] - looks[:, :, :5].median(dim=-1, keepdim=True).values).abs().mean())
    assert spread[1.0] < 0.6 * spread[0.0], spread
