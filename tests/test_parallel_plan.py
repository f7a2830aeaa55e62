"""The rank arrangement of a parallel run (``model_defs.parallel.plan``) and the process groups it makes, on a
real gloo world of 4 processes."""
import pytest

from comfyui_spacetime.model_defs.parallel.plan import ParallelPlan, fitting_plans, shard_bounds, shard_size
from parallel_procs import run_ranks


def test_coordinates_put_ulysses_innermost_and_cover_every_rank_once():
    plan = ParallelPlan(ulysses=2, ring=2, cfg=2)
    coordinates = [plan.coordinates(rank) for rank in range(plan.world_size)]
    assert coordinates[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert len(set(coordinates)) == 8 and all(plan.rank_of(*c) == r for r, c in enumerate(coordinates))


def test_shares_cover_a_sequence_that_does_not_divide():
    bounds = [shard_bounds(10, 4, index) for index in range(4)]
    assert shard_size(10, 4) == 3 and bounds == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [shard_bounds(2, 4, index) for index in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize(
    "plan, world, heads, message",
    [
        (ParallelPlan(ulysses=2, ring=2), 8, 12, "= 4 ranks, but the run has 8 processes; allowed: degrees whose product is 8"),
        (ParallelPlan(ulysses=4), 4, 6, "ulysses=4 does not divide the model's 6 attention heads; allowed values: [1, 2, 3, 6]"),
    ],
)
def test_a_plan_that_does_not_fit_names_the_input_and_what_fits(plan, world, heads, message):
    with pytest.raises(ValueError) as error:
        plan.check(world, heads)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("bad", [dict(ulysses=0), dict(ring=1.5), dict(cfg=3), dict(ulysses=True)])
def test_bad_degrees_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=f"^{next(iter(bad))}="):
        ParallelPlan(**bad)


def test_fitting_plans_lists_only_what_divides():
    assert fitting_plans(2, 3) == "ulysses=1 ring=2 cfg=1, ulysses=1 ring=1 cfg=2"


def test_groups_on_four_processes_join_the_ranks_the_plan_says():
    seen = run_ranks(4, "parallel_checks:group_members", 2, 1, 2)
    # plan ulysses=2 ring=1 cfg=2: ranks 0,1 run the positive pass, 2,3 the negative one
    assert seen[0] == {"ulysses": [0, 1], "ring": [0], "sequence": [0, 1], "cfg": [0, 2], "share": 0}
    assert seen[3] == {"ulysses": [2, 3], "ring": [3], "sequence": [2, 3], "cfg": [1, 3], "share": 1}
