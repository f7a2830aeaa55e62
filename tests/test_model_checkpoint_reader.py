"""Our safetensors reader (plain reads tensor by tensor, no memory map) gives exactly what safetensors gives,
for every dtype and odd shapes, and refuses damaged files with one line."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_spacetime.model_defs.checkpoint import CheckpointError, read_safetensors


def _tensors():
    generator = torch.Generator().manual_seed(0)
    floats = {name: torch.randn(3, 5, generator=generator).to(dtype) for name, dtype in [
        ("f64", torch.float64), ("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16),
        ("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)]}
    ints = {name: torch.randint(-100, 100, (7,), generator=generator).to(dtype) for name, dtype in [
        ("i64", torch.int64), ("i32", torch.int32), ("i16", torch.int16), ("i8", torch.int8)]}
    return {**floats, **ints, "u8": torch.arange(9, dtype=torch.uint8).view(3, 3), "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "big": torch.randn(257, 129, generator=generator)}


def test_reads_every_dtype_exactly_like_safetensors(tmp_path):
    path = tmp_path / "all.safetensors"
    save_file(_tensors(), path, metadata={"spacetime_dit_config": "{}", "note": "x"})
    ours, metadata = read_safetensors(path)
    theirs = load_file(path)
    assert metadata == {"spacetime_dit_config": "{}", "note": "x"}
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key  # byte-exact
    cast, _ = read_safetensors(path, torch.bfloat16)
    assert cast["f32"].dtype == torch.bfloat16 and cast["e4m3"].dtype == torch.float8_e4m3fn and cast["i32"].dtype == torch.int32


@pytest.mark.parametrize("damage", ["truncated", "garbled header", "huge header"])
def test_damaged_files_get_one_line(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "garbled header":
        data = data[:8] + b"{not json" + data[17:]
    else:
        data = (2**40).to_bytes(8, "little") + data[8:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable .safetensors file .* Download it again") as error:
        read_safetensors(path)
    assert "\n" not in str(error.value)


def test_a_dropped_model_gives_its_memory_back(monkeypatch, tmp_path):
    """The allocator is asked to return memory once, when the last tensor of a loaded model is freed."""
    import gc

    from comfyui_spacetime.model_defs import checkpoint

    trims = []
    monkeypatch.setattr(checkpoint, "_malloc_trim", lambda: trims.append(1))
    module = checkpoint.return_memory_when_freed(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)))
    del module
    gc.collect()
    assert trims == [1]
