"""The VAE decode split across ranks by spatial tiles (``model_defs.parallel.vae_decode``) on real gloo worlds of 2
and 4 CPU processes, with the built-in VAE: bit for bit the one-process tiled decode of the same tiles (on every
rank, or on rank 0 only), so within the tiled-decode tests' tolerance of the untiled decode; each rank decodes only
its own tiles; one-line errors before any work. Each world is spawned once (with
test_parallel_fsdp.py's checks: ``parallel_weight_checks.world_results``)."""
import pytest
import torch

from comfyui_spacetime.model_defs.vae_tiles import decode_tiled, tile_spans
from parallel_weight_checks import clip_latent, world_results
from test_jobs_vae_tiles import BOUNDS

WORLDS = (2, 4)
TILE = 64  # px: 8 latent pixels of the built-in VAE, with the default 16-px overlap


@pytest.fixture(scope="module")
def expected(tiny_vae):
    """The built-in VAE's latent of a 160x96 clip of moving discs (``clip_latent``) and its one-process decodes:
    tiled (the wide latent and its 96x64 crop) and untiled (it and a 32x32 crop)."""
    vae, latent = tiny_vae.vae, clip_latent()
    narrow = latent[..., :8, :12]
    with torch.inference_mode():
        return {"wide": decode_tiled(vae, latent, TILE), "narrow": decode_tiled(vae, narrow, TILE),
                "untiled": vae.decode(latent), "small_untiled": vae.decode(narrow[..., :4, :4])}


@pytest.fixture(scope="module")
def worlds():
    return {world: [result["vae"] for result in world_results(world)] for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
def test_split_decode_is_the_one_process_tiled_decode(worlds, expected, world):
    for rank, result in enumerate(worlds[world]):
        for name in ("wide", "narrow"):  # narrow: 2 tiles, so on 4 ranks two of them decode none
            split = torch.from_numpy(result[name])
            assert split.shape == expected[name].shape and (split - expected[name]).abs().max() <= 1e-5, (world, rank, name)
        assert (torch.from_numpy(result["untiled"]) - expected["small_untiled"]).abs().max() <= 1e-5  # one tile: whole
        if rank == 0:
            assert (torch.from_numpy(result["dst0"]) - expected["narrow"]).abs().max() <= 1e-5
        else:
            assert result["dst0"] is None


def test_split_decode_is_close_to_untiled_within_the_tiled_tolerance(worlds, expected):
    """The bounds of tests/test_jobs_vae_tiles.py for the built-in VAE on this clip, on pixels in 0..1."""
    decode_mean, decode_max = BOUNDS["builtin"][:2]
    for world in WORLDS:
        split = torch.from_numpy(worlds[world][0]["wide"]).add(1).mul(0.5).clamp(0, 1)
        diff = (split - expected["untiled"].add(1).mul(0.5).clamp(0, 1)).abs()
        assert diff.mean() <= decode_mean and diff.max() <= decode_max, (world, diff.mean(), diff.max())


@pytest.mark.parametrize("world", WORLDS)
def test_each_rank_decodes_only_its_own_tiles(worlds, world):
    tiles = len(tile_spans(12, 8, 2)) * len(tile_spans(20, 8, 2))  # 2 x 3
    counts = []
    for rank, result in enumerate(worlds[world]):
        mine = len(range(rank, tiles, world))
        chunks = result["chunks"]  # 2 latent frames per tile
        assert [done for done, _ in chunks] == list(range(1, 2 * mine + 1)) and all(total == 2 * mine for _, total in chunks)
        counts.append(mine)
    assert sum(counts) == tiles and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("world", WORLDS)
def test_bad_inputs_fail_on_every_rank_before_any_work(worlds, world):
    for result in worlds[world]:
        assert result["bad_tile"] == ("tile_size=12 is not allowed: it must be 0 (auto) or a multiple of 8 (the VAE's spatial "
                                      "factor), in pixels; nearest allowed values: [8, 16]")
        assert result["bad_dst"] == f"dst={world} is not allowed; allowed: None (every rank) or a rank from 0 to {world - 1}"
