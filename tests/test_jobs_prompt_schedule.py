"""Prompt schedules and the sampling math of long videos, without a model: parsing and its bad input (one line
naming the segment and what fits), per-frame prompt weights, context-window spans and blend weights, the blended
velocities, and the long-video plan's window/overlap checks on the latent grid."""
import pytest
import torch

from comfyui_spacetime.jobs.long_video import plan_long_video
from comfyui_spacetime.jobs.prompt_schedule import parse_schedule
from comfyui_spacetime.model_defs.flow_matching import guided_velocity
from comfyui_spacetime.model_defs.long_sampling import (
    freenoise, prompt_mix_velocity, rescheduled_noise, window_spans, window_weights, windowed_velocity,
)
from comfyui_spacetime.model_defs.sizes import SizeRules
from comfyui_spacetime.nodes.long_video import SpacetimeLongVideo, SpacetimePromptSchedule

VIDEO_RULES = SizeRules(8, 4, (1, 2, 2))


def test_schedule_lines_in_seconds_and_frames():
    text = "# a story\n0s: a red circle moving right\n\n1.5s : a red circle grows\n40: a red circle: moving left\n56f: a red circle grows"
    schedule = parse_schedule(text, 16.0, 8)
    assert [(s.start, s.prompt, s.line) for s in schedule.segments] == [
        (0, "a red circle moving right", 2), (24, "a red circle grows", 4), (40, "a red circle: moving left", 5), (56, "a red circle grows", 6)]
    assert schedule.prompts == ("a red circle moving right", "a red circle grows", "a red circle: moving left")  # each encoded once
    schedule.check_length(64)


@pytest.mark.parametrize("text, transition, match", [
    ("", 0, r"schedule is empty: write one segment per line"),
    ("a red circle", 0, r"schedule: line 1 \('a red circle'\) has no ':'"),
    ("0: ", 0, r"schedule line 1 \('0'\) has no prompt after the ':'"),
    ("soon: a circle", 0, r"schedule line 1 \('soon'\) has start 'soon', which is not a time: write seconds \('2s', '1.5s'\) or a frame index"),
    ("2s: a circle", 0, r"the first segment, schedule line 1 \('2s'\), starts at frame 32: it must start at 0"),
    ("0: a\n40: b\n20: c", 0, r"schedule line 3 \('20'\) starts at frame 20, before schedule line 2 \('40'\) at frame 40: list the segments in time order"),
    ("0: a\n1s: b\n16: c", 0, r"schedule line 3 \('16'\) and schedule line 2 \('1s'\) both start at frame 16: segments may not overlap; start it at frame 17 or later"),
    ("0: a\n10: b", 12, r"schedule line 2 \('10'\) starts 10 frames after schedule line 1 \('0'\), so their hand-overs of transition=12 frames overlap: start it at frame 12 or later"),
])
def test_bad_schedules_name_the_line_and_what_fits(text, transition, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(text, 16.0, transition)


def test_schedule_beyond_the_video_is_refused_before_sampling():
    schedule = parse_schedule("0: a\n3s: b", 16.0, 8)
    with pytest.raises(ValueError, match=r"schedule line 2 \('3s'\) starts at frame 48 but the video has 41 frames \(0 to 40 at 16 fps, 2.50s\): start it before frame 41"):
        schedule.check_length(41)
    with pytest.raises(ValueError, match=r"lasts 4 frames to the video's end, shorter than transition=8: start it at frame 44 or earlier"):
        schedule.check_length(52)
    # the node's check runs before any model is touched
    (encoded,) = SpacetimePromptSchedule().encode(_FakeEncoder(), "0: a\n3s: b", 16.0, 8)
    with pytest.raises(ValueError, match=r"starts at frame 48 but the video has 41 frames"):
        SpacetimeLongVideo().generate(None, _FakeVAE(), None, None, 64, 64, 41, 17, 5, 0, 1, 5.0, 5.0, "unipc", 1.0, "latent chain", encoded)


def test_node_validation_reports_a_bad_schedule_in_one_line():
    values = dict(schedule="0: a\n8: b", fps=16.0, transition=12)
    problem = SpacetimePromptSchedule.VALIDATE_INPUTS(**values)
    assert problem.startswith("schedule: schedule line 2 ('8') starts 8 frames after") and "\n" not in problem
    assert SpacetimePromptSchedule.VALIDATE_INPUTS(schedule="0: a\n12: b", fps=16.0, transition=12) is True


@pytest.mark.parametrize("transition", [0, 1, 8, 13])
def test_prompt_weights_sum_to_one_and_hand_over_around_each_change(transition):
    schedule = parse_schedule("0: a\n20: b\n40: a\n60: c", 16.0, transition)
    frames = torch.arange(0, 90, 0.5)
    weights = schedule.frame_weights(frames)  # [3 prompts, N]
    torch.testing.assert_close(weights.sum(0), torch.ones(len(frames), dtype=torch.float64))
    assert (weights >= 0).all()
    half = transition / 2
    for start, before, after in ((20, 0, 1), (40, 1, 0), (60, 0, 2)):
        assert weights[before, (frames < start - half) & (frames > start - 10)].eq(1).all()  # still the old prompt
        assert weights[after, (frames >= start + half) & (frames < start + 10)].eq(1).all()  # the new one in full
        if transition:
            assert weights[after, frames == start].item() == pytest.approx(0.5)  # half way at the change
    latent = schedule.latent_weights(0, 20, 4)  # latent frame j: the mean over its pixel frames
    torch.testing.assert_close(latent[:, 5], weights[:, (frames >= 17) & (frames <= 20) & (frames == frames.round())].mean(1))


@pytest.mark.parametrize("frames, window, overlap, spans", [
    (5, 5, 2, [(0, 5)]), (3, 5, 2, [(0, 3)]), (11, 5, 2, [(0, 5), (3, 8), (6, 11)]), (12, 5, 2, [(0, 5), (3, 8), (6, 11), (7, 12)]),
    (241, 5, 2, None), (10, 5, 1, [(0, 5), (4, 9), (5, 10)]),
])
def test_windows_cover_the_latent_and_blend_weights_sum_to_one(frames, window, overlap, spans):
    found = window_spans(frames, window, overlap)
    if spans is not None:
        assert found == spans
    assert found[0][0] == 0 and found[-1][1] == frames and all(b - a == min(window, frames) for a, b in found)
    assert all(next_a <= b - overlap for (_, b), (next_a, _) in zip(found, found[1:]))  # at least `overlap` shared
    weights = window_weights(found, frames)
    torch.testing.assert_close(weights.sum(0), torch.ones(frames, dtype=torch.float64))
    for index, (a, b) in enumerate(found):
        assert (weights[index, :a] == 0).all() and (weights[index, b:] == 0).all() and (weights[index, a:b] > 0).all()


def test_windowed_velocity_blends_each_windows_own_velocity():
    spans = window_spans(12, 5, 2)
    weights = window_weights(spans, 12)
    x = torch.randn(1, 3, 12, 2, 2)
    # every window sees exactly its frames; a velocity that is the same function everywhere comes back unchanged
    seen = []
    same = windowed_velocity(lambda i: (lambda xs, t: seen.append(xs.shape[2]) or xs * 2 + t.view(-1, 1, 1, 1, 1)), spans, weights)
    torch.testing.assert_close(same(x, torch.tensor([3.0])), x * 2 + 3)
    assert seen == [5, 5, 5, 5]
    # window i answering the constant i: each frame gets the weighted mean of the windows over it
    mixed = windowed_velocity(lambda i: (lambda xs, t: torch.full_like(xs, float(i))), spans, weights)(x, torch.tensor([0.0]))
    expected = (weights * torch.arange(4.0, dtype=torch.float64)[:, None]).sum(0).float()
    torch.testing.assert_close(mixed[0, 0, :, 0, 0], expected)
    # one window is the window's velocity itself
    single = lambda xs, t: xs  # noqa: E731
    assert windowed_velocity(lambda i: single, [(0, 12)], window_weights([(0, 12)], 12)) is single


@pytest.mark.parametrize("frames", [5, 7, 12, 13])
def test_freenoise_repeats_shuffled_earlier_frames(frames):
    noise = torch.randn(1, 2, frames, 3, 3)
    # correlation 1 (FreeNoise as published): the first window is the noise's own; every later run of stride = 3
    # frames is a reordering of the 3 frames one window (5) earlier, so each window holds the first window's frames
    out = freenoise(noise, 5, 2, seed=4, correlation=1.0)
    torch.testing.assert_close(out[:, :, :5], noise[:, :, :5], rtol=0, atol=0)
    for start in range(5, frames, 3):
        run = out[:, :, start: min(start + 3, frames)]
        earlier = [out[:, :, j] for j in range(start - 5, start - 2)]
        for k in range(run.shape[2]):
            assert sum(torch.equal(run[:, :, k], e) for e in earlier) == 1
        assert len({tuple(run[0, 0, k].flatten().tolist()) for k in range(run.shape[2])}) == run.shape[2]  # no frame twice
    assert torch.equal(freenoise(noise, 5, 2, seed=4, correlation=1.0), out)  # the seed fixes the shuffles


def test_rescheduled_noise_mixes_a_shuffle_with_fresh_noise_at_unit_variance():
    earlier, fresh = torch.randn(1, 16, 3, 32, 32), torch.randn(1, 16, 2, 32, 32)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(9))[:2]
    shuffled, out = rescheduled_noise(earlier, fresh, torch.Generator().manual_seed(9), correlation=0.6)
    torch.testing.assert_close(shuffled, earlier[:, :, order], rtol=0, atol=0)
    torch.testing.assert_close(out, 0.6 * earlier[:, :, order] + 0.8 * fresh)
    assert out.std().item() == pytest.approx(1.0, abs=0.03)
    torch.testing.assert_close(rescheduled_noise(earlier, fresh, torch.Generator().manual_seed(9), correlation=0.0)[1], fresh)
    # with the shipped share, each new frame is correlated with its source and not with the other earlier frames
    _, out = rescheduled_noise(earlier, fresh, torch.Generator().manual_seed(9))
    corr = torch.corrcoef(torch.stack([out[0, :, 0].flatten(), earlier[0, :, order[0]].flatten(), fresh[0, :, 0].flatten()]))
    assert corr[0, 1] > 0.75 and 0.4 < corr[0, 2] < 0.8


def test_freenoise_keeps_its_correlation_with_the_first_window_however_long():
    # the shuffles are of unmixed frames: 40 windows on, each frame is still 0.8 one of the first window's frames
    noise = torch.randn(1, 16, 125, 16, 16)
    out = freenoise(noise, 5, 2, seed=1)
    first = out[0, :, :5].transpose(0, 1).reshape(5, -1)
    for frame in (7, 60, 124):
        best = max(float(torch.corrcoef(torch.stack([out[0, :, frame].flatten(), f]))[0, 1]) for f in first)
        assert best == pytest.approx(0.8, abs=0.05)


def _linear_model(x, t, context):
    return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1)


def test_prompt_mix_is_guidance_on_the_mixed_positive_velocity():
    x, t = torch.randn(1, 2, 4, 2, 2), torch.tensor([500.0])
    a, b, negative = torch.full((1, 3, 2), 1.0), torch.full((1, 3, 2), 3.0), torch.full((1, 3, 2), -1.0)
    weights = torch.tensor([[1.0, 0.75, 0.25, 0.0], [0.0, 0.25, 0.75, 1.0]])
    for cfg in (1.0, 4.0):
        mixed = prompt_mix_velocity(_linear_model, [a, b], weights, negative, cfg)(x, t)
        v_a, v_b, v_neg = (_linear_model(x, t, c) for c in (a, b, negative))
        v_pos = weights[0].view(1, 1, -1, 1, 1) * v_a + weights[1].view(1, 1, -1, 1, 1) * v_b
        torch.testing.assert_close(mixed, v_pos if cfg == 1.0 else v_neg + cfg * (v_pos - v_neg))
    # one prompt active: exactly the plain guided velocity
    only = prompt_mix_velocity(_linear_model, [a, b], torch.tensor([[0.0] * 4, [1.0] * 4]), negative, 4.0)(x, t)
    torch.testing.assert_close(only, guided_velocity(_linear_model, b, negative, 4.0)(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_frames, overlap, mode, match", [
    (18, 5, "context windows", r"chunk_frames=18 is not allowed: it must be 1 \+ 4\*k with k >= 1 \(whole latent frames.*nearest: 17, 21\)"),
    (17, 6, "context windows", r"overlap=6 is not allowed with chunk_frames=17: it must be 1 \+ 4\*m \(whole latent frames\).*nearest: 5, 9\)"),
    (17, 17, "context windows", r"overlap=17 is not allowed with chunk_frames=17: .*smaller than chunk_frames.*nearest: 13\)"),
    (17, 21, "latent chain", r"overlap=21 is not allowed with chunk_frames=17: .*nearest: 13\)"),
    (17, 5, "windows", r"mode='windows' is not allowed; allowed values: \['context windows', 'latent chain', 'pixel chain'\]"),
])
def test_window_and_overlap_must_sit_on_the_latent_grid(chunk_frames, overlap, mode, match):
    with pytest.raises(ValueError, match=match):
        plan_long_video(VIDEO_RULES, 64, 64, 961, chunk_frames, overlap, mode)
    problem = SpacetimeLongVideo.VALIDATE_INPUTS(width=64, height=64, frames=961, chunk_frames=chunk_frames, overlap=overlap, seed=0,
                                                 steps=4, cfg=5.0, shift=5.0, scheduler="unipc", strength=1.0, mode=mode)
    assert isinstance(problem, str) and "\n" not in problem


def test_a_minutes_windows_and_latent_stay_small():
    plan = plan_long_video(VIDEO_RULES, 64, 64, 961, 17, 5, "context windows")
    assert plan.latent_frames == 241 and plan.runs == 1
    assert len(plan.windows) == 80 and {b - a for a, b in plan.windows} == {5}  # every DiT call sees one window
    assert plan_long_video(VIDEO_RULES, 64, 64, 961, 17, 5).runs == 1  # the default mode: the windows
    assert plan_long_video(VIDEO_RULES, 64, 64, 961, 17, 5, "latent chain").runs == 80


class _FakeEncoder:
    """A text encoder stand-in: the schedule node only needs ``encode`` and a module to place."""

    name, text_len = "fake", 4

    class encoder:  # noqa: N801 - mirrors SpacetimeTextEncoder.encoder
        model = torch.nn.Linear(1, 1)

        @staticmethod
        def encode(prompts, text_len):
            from comfyui_spacetime.model_defs.text_encoders import EncodedText

            return EncodedText(torch.zeros(len(prompts), text_len, 8), torch.ones(len(prompts), text_len, dtype=torch.bool),
                               tuple(prompts), (False,) * len(prompts))


class _FakeVAE:
    video_rules = VIDEO_RULES
