"""Whole sampling runs with a parallel DiT (``model_defs.parallel.sequence``) on a gloo world of 4 CPU processes
equal the single-process runs within 1e-5 on every rank: ``generate`` with guidance (cfg 5, UniPC) and without
(cfg 1: the guided batch of one row runs whole on both CFG ranks), packed sampling of videos of different sizes,
and step-cached runs (fbcache, teacache), whose skip decisions are taken over all ranks' tokens and rows: the
same evaluations are computed as in one process, and no rank waits on another."""
import pytest

from parallel_dit_checks import SAMPLING_PLANS
from parallel_procs import run_ranks

RUNS = ["generate_unipc", "generate_cfg1", "packed_unipc", "fbcache", "teacache"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def results():
    return run_ranks(4, "parallel_dit_checks:sampling_errors")


@pytest.mark.parametrize("plan", list(SAMPLING_PLANS))
def test_parallel_sampling_equals_the_single_process_run_on_every_rank(results, plan):
    for rank, by_plan in enumerate(results):
        measured = by_plan[plan]
        assert sorted(measured) == sorted(RUNS)
        for run, (error, counts, single_counts) in measured.items():
            assert error <= TOLERANCE, f"rank {rank}, {plan}, {run}: max error {error}"
            assert counts == single_counts, f"rank {rank}, {plan}, {run}: (evaluations, computed) {counts} vs {single_counts}"


def test_the_cached_runs_do_skip_evaluations(results):
    for run in ("fbcache", "teacache"):
        _, _, (evaluations, computed) = results[0]["cfg2_ulysses2"][run]
        assert 0 < computed < evaluations, (run, evaluations, computed)
