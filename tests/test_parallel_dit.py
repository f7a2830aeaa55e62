"""Sequence- and CFG-parallel DiT forwards (``model_defs.parallel.sequence``) equal the single-process forward on
real gloo worlds of 2 and 4 CPU processes: Ulysses, ring, USP (ulysses x ring) and CFG parallel, dense (per-sample
and per-frame timesteps, an odd batch), the CLIP branch and packed videos of different sizes (one shorter than any
degree), fp32, within 1e-5 on every rank. One world per size for the whole module: starting processes is the slow
part."""
import pytest

from comfyui_spacetime.model_defs.parallel.plan import ParallelGroups, ParallelPlan
from comfyui_spacetime.model_defs.parallel.sequence import parallelize
from parallel_dit_checks import PLANS, tiny_dit
from parallel_procs import run_ranks

CASES = ["dense", "dense_per_frame", "dense_one_sample", "clip", "packed", "packed_per_frame", "packed_even",
         "packed_even_per_frame"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def errors():
    return {world: run_ranks(world, "parallel_dit_checks:world_checks") for world in PLANS}


@pytest.mark.parametrize("world, plan", [(world, plan) for world, plans in PLANS.items() for plan in plans])
def test_parallel_forward_equals_single_process_on_every_rank(errors, world, plan):
    for rank, checks in enumerate(errors[world]):
        measured = checks["forward"][plan]
        assert sorted(measured) == sorted(CASES)
        worst = {case: error for case, error in measured.items() if not error <= TOLERANCE}
        assert not worst, f"rank {rank}, {plan}: {worst}"


@pytest.mark.parametrize("world", list(PLANS))
def test_streamed_weights_compose_and_compiled_blocks_are_refused_in_one_line(errors, world):
    for checks in errors[world]:
        result = checks["composition"]
        assert result["streamed"] <= TOLERANCE
        assert result["compile"].startswith("compile='on' is not allowed with multi-GPU") and "\n" not in result["compile"]


def test_ulysses_that_does_not_divide_the_heads_is_refused_at_parallelize_time():
    dit = tiny_dit()  # 4 heads
    groups = ParallelGroups(ParallelPlan(ulysses=3), 0, None, None, None, None, None)  # no collective is reached
    with pytest.raises(ValueError) as error:
        parallelize(dit, groups)
    message = str(error.value)
    assert message == "ulysses=3 does not divide the model's 4 attention heads; allowed values: [1, 2, 4]"
    assert dit.parallel is None
