"""The built-in model's prompt extension maps paraphrases onto its training vocabulary."""
import pytest

from comfyui_spacetime.jobs import builtin_prompt
from comfyui_spacetime.jobs.builtin_prompt import builtin_caption
from comfyui_spacetime.nodes.prompt import SpacetimeExtendPrompt
from comfyui_spacetime.training import procedural


def test_canonical_words_are_the_training_vocabulary():
    assert set(builtin_prompt.COLOURS) == set(procedural.COLOURS)
    assert set(builtin_prompt.SHAPES) == set(procedural.SHAPES)
    assert set(builtin_prompt.MOTIONS) == set(procedural.MOTIONS) == set(builtin_prompt.MOTION_PHRASES)
    assert set(builtin_prompt.BACKGROUNDS) == set(procedural.BACKGROUNDS)
    for motion, phrase in builtin_prompt.MOTION_PHRASES.items():
        assert phrase == procedural._MOTION_PHRASES[motion][0]  # a phrase the model was trained on


@pytest.mark.parametrize("prompt, caption", [
    ("a crimson ball rolling leftwards", "a red circle drifts to the left"),
    ("An emerald cube climbing slowly against a navy backdrop", "a green square rises on a dark blue background"),
    ("turquoise pyramid that keeps getting bigger", "a cyan triangle grows"),
    ("a golden starfish sinking, checkerboard background", "a yellow star falls on a checkered background"),
    ("violet disc, motionless, on a white background", "a purple circle stays still on a white background"),
    ("a red circle drifts to the left over a grey background", "a red circle drifts to the left on a grey background"),
])
def test_paraphrases_map_to_training_words(prompt, caption):
    assert builtin_caption(prompt) == (caption, "")


def test_partial_and_unknown_prompts_say_what_is_missing():
    assert builtin_caption("a magenta thing") == ("a pink shape", "not recognised: shape, motion")
    assert builtin_caption("a dog barking") == ("a dog barking", "nothing in the prompt names a colour, shape or motion the built-in model knows: passed through")


def test_node_offers_the_built_in_mapping():
    prompt, note = SpacetimeExtendPrompt().extend("a scarlet orb plummets", "t2v", "built-in", "", "", "", 0, 256, "fail")
    assert (prompt, note) == ("a red circle falls", "")
