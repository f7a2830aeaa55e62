"""FSDP-sharded DiT blocks (``model_defs.parallel.fsdp``) on real gloo worlds of 2 and 4 CPU processes: the sharded
DiT gives the unsharded one's output (fp32 dense and packed, bf16 with fp8 FFN weights, under the sequence- and
CFG-parallel patch), each rank holds its share of the block weights, and only the running block is gathered. Each
world is spawned once (with test_parallel_vae.py's checks: ``parallel_weight_checks.world_results``)."""
import dataclasses

import pytest
import torch

from comfyui_spacetime.model_defs.parallel.fsdp import fsdp_weight_bytes, held_block_bytes, shard_blocks
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS, WanDiT
from parallel_weight_checks import FSDP_CONFIG, world_results

WORLDS = (2, 4)
VARIANTS = ("fp32", "fp32_no_prefetch", "fp8")


@pytest.fixture(scope="module")
def worlds():
    return {world: [result["fsdp"] for result in world_results(world)] for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_blocks_give_the_unsharded_output(worlds, world):
    for rank, result in enumerate(worlds[world]):
        for variant in VARIANTS:
            assert result[variant]["error"] <= 1e-5, (world, rank, variant, result[variant]["error"])
        assert result["fp32"]["packed_error"] <= 1e-5, (world, rank)
        # every rank computed the same thing from its own shards
        assert result["fp32"]["output"] == worlds[world][0]["fp32"]["output"]


@pytest.mark.parametrize("world", WORLDS)
def test_each_rank_holds_its_share_of_the_block_weights(worlds, world):
    for result in worlds[world]:
        for variant in VARIANTS:
            whole, held = result[variant]["whole_bytes"], result[variant]["held_bytes"]
            # 1/N of every parameter, the last rows zero-padded (3 heads x 12, FFN 50: sizes that do not divide)
            padding = 1.25 if world == 4 else 1.1
            assert whole / world <= held <= whole / world * padding, (world, variant, whole, held)
            assert result[variant]["held_after"] == held  # gathered copies freed after the forwards
    # the formula the benchmark uses counts what the ranks hold (its fp32 non-block weights and no block in flight)
    with torch.device("meta"):
        non_block = sum(p.numel() * 4 for n, p in WanDiT(FSDP_CONFIG).named_parameters() if not n.startswith("blocks."))
    formula = fsdp_weight_bytes(FSDP_CONFIG, world, torch.float32, gathered_blocks=0) - non_block
    assert formula == worlds[world][0]["fp32"]["held_bytes"]


@pytest.mark.parametrize("world", WORLDS)
def test_weights_keep_their_dtype_and_only_the_running_block_is_gathered(worlds, world):
    for result in worlds[world]:
        assert result["fp8"]["dtypes"] == ["torch.bfloat16", "torch.float8_e4m3fn"]
        assert all(result[variant]["dtypes_kept"] for variant in VARIANTS)
        for variant in VARIANTS:
            assert result[variant]["gathered"] == [[0], [1], [2]], variant  # while block i runs, only block i is whole
        assert result["again"] == "this DiT's blocks are already sharded (shard_blocks runs once per loaded model)"


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_blocks_compose_with_sequence_and_cfg_parallel(world):
    """CFG over 2 ranks and ring attention over the others (``sequence.parallelize``), weights sharded over all."""
    for result in world_results(world):
        combined = result["fsdp_sequence"]
        assert combined["error"] <= 1e-5 and combined["packed_error"] <= 1e-5, (world, combined)
        assert combined["held_bytes"] == result["fsdp"]["fp32"]["held_bytes"]  # sharded over the whole world


def test_weight_bytes_per_rank_for_the_14b_model():
    """Wan 2.1 14B in bf16: 14.29 B parameters, 26.6 GiB on one device; 40 blocks of 0.65 GiB and 0.43 GiB outside
    them. Per rank: the outside whole, 1/N of each block (its dimensions all divide by 8; only
    the per-block modulation table, one row, is held whole) and two
    whole blocks in flight (the running one and the prefetched next)."""
    config = DIT_PRESETS["wan2.1-t2v-14b"]
    with torch.device("meta"):
        dit = WanDiT(dataclasses.replace(config, num_layers=1))
    block = sum(p.numel() for p in dit.blocks[0].parameters()) * 2
    non_block = sum(p.numel() for n, p in dit.named_parameters() if not n.startswith("blocks.")) * 2
    assert fsdp_weight_bytes(config, 1) == non_block + 40 * block and 14.28e9 < (non_block + 40 * block) / 2 < 14.3e9
    modulation = dit.blocks[0].modulation.numel() * 2  # [1, 6, C]: one row, which Shard(0) cannot split
    for world in (2, 4, 8):
        ideal = non_block + 40 * block // world + 2 * block
        assert fsdp_weight_bytes(config, world) == ideal + 40 * (modulation - modulation // world)
        assert fsdp_weight_bytes(config, world, gathered_blocks=1) == fsdp_weight_bytes(config, world) - block
    assert 8.2 * 2**30 < fsdp_weight_bytes(config, 4) < 8.4 * 2**30  # fits a 24 GB card with room for activations


def test_bad_inputs_are_one_line_errors():
    with torch.device("meta"):
        dit = WanDiT(FSDP_CONFIG)
    with pytest.raises(ValueError, match=r"^shard_blocks needs the DiT's blocks on one device with their weights loaded, got \['meta'\]$"):
        shard_blocks(dit, groups=None)
    with pytest.raises(ValueError, match=r"^world=0 is not allowed: it must be an integer >= 1$"):
        fsdp_weight_bytes(FSDP_CONFIG, 0)
    assert held_block_bytes(WanDiT(FSDP_CONFIG)) > 0
