"""Weight streaming from the loader node: gpu_budget_gb streams the loaded DiT, bad budgets are refused at
validation with one line naming the input; inside ComfyUI (stand-in modules) its memory manager is given the
streamed DiT's resident part, and asked for the in-flight blocks' room beside it, never the whole model."""
import math
import sys
import types

import pytest
import torch

from comfyui_spacetime.model_defs.builtin import BUILTIN_MODEL
from comfyui_spacetime.model_defs.weight_streaming import GIB, module_bytes, plan_for_blocks
from comfyui_spacetime.nodes import comfy_glue
from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader


def test_the_loader_streams_to_the_budget(tiny_model):
    budget = plan_for_blocks(tiny_model.dit, 2).device_bytes / GIB
    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "default", "reference", gpu_budget_gb=budget)
    assert model.streamer is not None
    assert len(model.streamer.plan.streamed) == tiny_model.config.num_layers - 2
    (plain,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "default", "reference")  # 0 by default: off
    assert plain.streamer is None


@pytest.mark.parametrize("budget, message", [
    (-1.0, "gpu_budget_gb: -1.0 is out of range; allowed: 0.0 to 4096.0"),
    (math.nan, "gpu_budget_gb: nan is not a finite number; allowed: 0.0 to 4096.0"),
])
def test_a_bad_budget_is_refused_at_validation(budget, message):
    values = {"model_name": BUILTIN_MODEL, "weight_dtype": "default", "kernels": "auto", "gpu_budget_gb": budget}
    assert SpacetimeModelLoader.VALIDATE_INPUTS(**values) == message
    assert SpacetimeModelLoader.VALIDATE_INPUTS(**{**values, "gpu_budget_gb": 2.5}) is True
    with pytest.raises(ValueError, match=r"^gpu_budget_gb=.* is not allowed"):
        SpacetimeModelLoader().load(BUILTIN_MODEL, "default", "reference", gpu_budget_gb=budget)


def test_comfyui_is_given_the_resident_part_and_the_in_flight_room(tiny_model, monkeypatch):
    loads = []

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model = model

    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = mm.vae_device = mm.text_encoder_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda patchers, **kwargs: loads.append((patchers[0], kwargs))
    patcher_module = types.ModuleType("comfy.model_patcher")
    patcher_module.ModelPatcher = ModelPatcher
    for name, module in {"comfy": types.ModuleType("comfy"), "comfy.model_management": mm, "comfy.model_patcher": patcher_module}.items():
        monkeypatch.setitem(sys.modules, name, module)

    budget = plan_for_blocks(tiny_model.dit, 1).device_bytes / GIB
    (model,) = SpacetimeModelLoader().load(BUILTIN_MODEL, "default", "reference", gpu_budget_gb=budget)
    plan = model.streamer.plan
    with comfy_glue.device_slot() as slot:
        slot.use(model.streamer.resident)
    patcher, kwargs = loads[0]
    # ComfyUI sizes a model by its state dict (comfy.model_management.module_size): the resident bytes only
    assert module_bytes(patcher.model) == plan.resident < module_bytes(model.dit)
    assert kwargs == {"memory_required": plan.in_flight, "force_full_load": True}
    held = {id(t) for t in patcher.model.state_dict(keep_vars=True).values()}
    assert not any(id(t) in held for index in plan.streamed for t in model.dit.blocks[index].state_dict(keep_vars=True).values())
