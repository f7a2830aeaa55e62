"""Inside ComfyUI the glue uses ComfyUI's folders, progress bar and interrupt: simulated here with
stand-in modules, since ComfyUI itself is not a test dependency."""
import sys
import types

import pytest

from comfyui_spacetime.nodes import comfy_glue


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    calls = {"progress": [], "interrupt_after": None, "checks": 0}
    (tmp_path / "wan.safetensors").write_bytes(b"")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls["progress"].append((value, total))

    def throw_exception_if_processing_interrupted():
        calls["checks"] += 1
        if calls["interrupt_after"] is not None and calls["checks"] > calls["interrupt_after"]:
            raise Interrupted()

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: ["wan.safetensors", "notes.txt"] if folder == "diffusion_models" else []
    folder_paths.get_full_path = lambda folder, name: str(tmp_path / name) if name == "wan.safetensors" else None
    folder_paths.get_folder_paths = lambda folder: [str(tmp_path)]
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_folders_come_from_comfyui(fake_comfy):
    assert comfy_glue.in_comfyui()
    assert comfy_glue.list_model_files("diffusion_models") == ["wan.safetensors"]
    assert comfy_glue.model_file_path("diffusion_models", "wan.safetensors", "model_name").name == "wan.safetensors"
    with pytest.raises(FileNotFoundError, match="model_name='gone.safetensors'.*Available: \\['wan.safetensors'\\]"):
        comfy_glue.model_file_path("diffusion_models", "gone.safetensors", "model_name")


def test_progress_and_interrupt_go_through_comfyui(fake_comfy):
    progress = comfy_glue.Progress(5, "sampling")
    progress.update(1)
    progress.update(2)
    assert fake_comfy["progress"] == [(1, 5), (2, 5)]
    fake_comfy["interrupt_after"] = fake_comfy["checks"]
    with pytest.raises(Interrupted):
        progress.update(3)


def test_without_comfyui_text_progress(capsys):
    assert not comfy_glue.in_comfyui()
    progress = comfy_glue.Progress(2, "decoding")
    progress.update(1)
    progress.update(2)
    assert "decoding" in capsys.readouterr().err


def test_device_slot_holds_one_expert_at_a_time_inside_comfyui(fake_comfy, monkeypatch):
    """Inside ComfyUI each module is loaded through its ModelPatcher; handing over to the next unloads the one
    before from ComfyUI's loaded models at once (two 14B experts need one expert's room); the last stays loaded."""
    import torch

    mm = sys.modules["comfy.model_management"]
    events = []

    class Loaded:
        def __init__(self, patcher):
            self.model = patcher

        def model_unload(self, memory_to_free=None, unpatch_weights=True):
            events.append(("unload", self.model.name))
            return True

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.name = type(model).__name__ + str(id(model.module) % 97)
            self.module = model.module

    mm.current_loaded_models = []
    mm.get_torch_device = mm.vae_device = mm.text_encoder_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda: events.append(("empty",))

    def load_models_gpu(patchers, force_full_load=False):
        for patcher in patchers:
            events.append(("load", patcher.name))
            mm.current_loaded_models.append(Loaded(patcher))

    mm.load_models_gpu = load_models_gpu
    patcher_module = types.ModuleType("comfy.model_patcher")
    patcher_module.ModelPatcher = ModelPatcher
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher_module)

    high, low = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with comfy_glue.device_slot() as slot:
        slot.use(high)
        slot.use(high)  # the same expert again: nothing moves
        slot.use(low)
    names = [event[1] if len(event) > 1 else None for event in events]
    assert [event[0] for event in events] == ["load", "unload", "empty", "load"]
    assert names[0] == names[1] != names[3]  # high loaded, high unloaded, then low loaded
    assert len(mm.current_loaded_models) == 1 and mm.current_loaded_models[0].model.module is low
