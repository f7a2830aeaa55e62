"""The shipped story workflow tells its story: run with its own schedule and settings on the built-in model, the
detector sees each segment's asked-for motion in at least 3 of its 4 segments (issue 20, item 5)."""
import json
from pathlib import Path

import torch

from comfyui_spacetime.jobs.prompt_schedule import parse_schedule
from comfyui_spacetime.jobs.text_to_video import encode_prompts
from comfyui_spacetime.model_defs.builtin import builtin_text_encoder
from comfyui_spacetime.nodes.long_video import SpacetimeLongVideo, SpacetimePromptSchedule
from comfyui_spacetime.training.detector import detect
from comfyui_spacetime.training.procedural import _MOTION_PHRASES

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "spacetime_long_story_builtin.json"


def _node(workflow: dict, node_type: str) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type]
    return node


def _asked_motion(prompt: str) -> str:
    """The motion a prompt asks for, by the built-in model's own phrases."""
    (motion,) = [m for m, phrases in _MOTION_PHRASES.items() if any(p in prompt for p in phrases)]
    return motion


def test_the_story_workflow_shows_each_segments_motion(tiny_model, tiny_vae):
    workflow = json.loads(WORKFLOW.read_text())
    text, fps, transition = _node(workflow, "SpacetimePromptSchedule")["widgets_values"]
    width, height, frames, chunk_frames, overlap, seed, _control, steps, cfg, shift, scheduler, strength, mode, look_anchor = \
        _node(workflow, "SpacetimeLongVideo")["widgets_values"]
    schedule = parse_schedule(text, fps, transition)
    assert len(schedule.segments) == 4 and mode == "latent chain"

    encoder = builtin_text_encoder()
    (prompts,) = SpacetimePromptSchedule().encode(encoder, text, fps, transition)
    negative = encode_prompts(encoder, [""])[0]
    (video,) = SpacetimeLongVideo().generate(tiny_model, tiny_vae, negative, negative, width, height, frames, chunk_frames,
                                             overlap, seed, steps, cfg, shift, scheduler, strength, mode, prompts, look_anchor)
    assert video.shape == (frames, height, width, 3) and torch.isfinite(video).all()

    ends = [s.start for s in schedule.segments[1:]] + [frames]
    seen = []
    for segment, end in zip(schedule.segments, ends):
        clip = video[max(segment.start - 1, 0): end].numpy()  # from the frame before the change: the motion's two ends
        seen.append((_asked_motion(segment.prompt), detect(clip).motion))
    assert sum(asked == found for asked, found in seen) >= 3, seen
