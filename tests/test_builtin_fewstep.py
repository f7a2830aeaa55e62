"""The built-in model's few-step LoRA: the shipped file loads through Spacetime Load LoRA (under its built-in name), fits
every layer it names and is small; what the training wrapper learns is what the LoRA loader applies; the teacher's
recorded states are the solver's; bad input to the LoRA node (NaN strength, a pickle) is refused in one line."""
import logging
import math
import pickle

import pytest
import torch

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.builtin import BUILTIN_FEWSTEP_LORA, FEWSTEP_LORA_FILE, WEIGHTS_DIR
from comfyui_spacetime.model_defs.checkpoint import CheckpointError, write_safetensors
from comfyui_spacetime.model_defs.flow_matching import guided_velocity, initial_noise, sample
from comfyui_spacetime.model_defs.lora import applied, bind_lora, read_lora, AppliedLora
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.nodes.lora import SpacetimeLoadLoRA
from comfyui_spacetime.training.fewstep_lora import (
    STUDENT_STEPS, TEACHER_STEPS, LoraTrainer, student_levels, teacher_levels, teacher_trajectories,
)

CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)


def _dit(seed: int = 0) -> WanDiT:
    dit = WanDiT(CONFIG, REFERENCE).eval()
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    return dit


def test_the_shipped_lora_is_small_and_fits_the_builtin_dit_everywhere(tiny_model, caplog):
    path = WEIGHTS_DIR / FEWSTEP_LORA_FILE
    assert path.stat().st_size <= 2 * 1024 * 1024
    with caplog.at_level(logging.WARNING):
        lora = bind_lora(read_lora(path), tiny_model.dit, tiny_model.name)
    assert "match no layer" not in caplog.text
    assert len(lora.linears) == 6 * 10 + 2 + 1 + 1 and len(lora.params) == 6 + 1  # block linears, time MLPs, head; modulations


def test_the_lora_node_offers_and_loads_the_builtin_lora(tiny_model):
    assert SpacetimeLoadLoRA.INPUT_TYPES()["required"]["lora_name"][0][0] == BUILTIN_FEWSTEP_LORA
    (model,) = SpacetimeLoadLoRA().load(tiny_model, BUILTIN_FEWSTEP_LORA, 1.0, "unmerged")
    assert [(a.lora.name, a.strength) for a in model.loras] == [(FEWSTEP_LORA_FILE, 1.0)] and tiny_model.loras == ()
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 32, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_model.dit(x, torch.tensor([900.0]), context)
        with applied(model.dit, model.loras):
            distilled = model.dit(x, torch.tensor([900.0]), context)
    assert (distilled - base).abs().max() > 1e-3  # the LoRA changes the velocity


def test_lora_node_refuses_nan_strength_and_a_pickle(tiny_model, tmp_path, monkeypatch):
    problem = SpacetimeLoadLoRA.VALIDATE_INPUTS(lora_name=BUILTIN_FEWSTEP_LORA, strength=math.nan, mode="unmerged")
    assert problem == "strength: nan is not a finite number; allowed: -10.0 to 10.0"
    with pytest.raises(ValueError, match=r"^strength=nan is not allowed: it must be a finite number"):
        SpacetimeLoadLoRA().load(tiny_model, BUILTIN_FEWSTEP_LORA, math.nan, "unmerged")
    monkeypatch.setenv("SPACETIME_MODELS_DIR", str(tmp_path))
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "fewstep.safetensors").write_bytes(pickle.dumps({"lora_down": [1.0]}))  # a pickle, renamed
    with pytest.raises(CheckpointError) as error:
        SpacetimeLoadLoRA().load(tiny_model, "fewstep.safetensors", 1.0, "unmerged")
    assert "\n" not in str(error.value) and "fewstep.safetensors" in str(error.value)


def test_what_the_trainer_learns_is_what_the_loader_applies(tmp_path):
    trainer = LoraTrainer(_dit(), rank=4, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking values, stored exactly in fp16 (the file's precision)
        for param in [*trainer.down.values(), *trainer.up.values()]:
            param.copy_((torch.randn(param.shape, generator=generator) * 0.1).half().float())
        params = dict(trainer.dit.named_parameters())
        for name in trainer.modulations:
            params[name].copy_(trainer.base[name] + (torch.randn(params[name].shape, generator=generator) * 0.1).half().float())
    x = torch.randn(2, 16, 2, 4, 6, generator=generator)
    t, context = torch.tensor([1000.0, 625.0]), torch.randn(2, 9, 20, generator=generator)
    with torch.no_grad():
        want = trainer.dit(x, t, context)
    write_safetensors(tmp_path / "student.safetensors", trainer.lora_tensors(), {})
    plain = _dit().requires_grad_(False)
    lora = bind_lora(read_lora(tmp_path / "student.safetensors"), plain)
    with torch.no_grad(), applied(plain, (AppliedLora(lora, 1.0),)):
        got = plain(x, t, context)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (plain(x, t, context) - want).abs().max() > 1e-2  # and without it the DiT is the base one again


def test_teacher_states_are_the_solver_states_at_the_student_levels():
    levels, teacher = student_levels(), teacher_levels()
    every = TEACHER_STEPS // STUDENT_STEPS
    torch.testing.assert_close(teacher[::every][1:], levels[1:])  # the teacher passes every student level
    dit = _dit().requires_grad_(False)
    contexts, negative = torch.randn(3, 9, 20), torch.zeros(1, 9, 20)
    shape = (1, 16, 1, 2, 4)
    data = teacher_trajectories(dit, contexts, negative, shape, seed=5, log=lambda _: None, batch=2)
    assert data.states.shape == (3, STUDENT_STEPS + 1, 16, 1, 2, 4)
    noise = initial_noise(shape, 7)
    assert torch.equal(data.states[2, 0], noise[0])  # prompt 2 starts from the noise of seed 5 + 2
    with torch.no_grad():
        final = sample(guided_velocity(dit, contexts[2:], negative, 5.0), torch.zeros_like(noise), noise, teacher, "unipc")
    torch.testing.assert_close(data.states[2, -1], final[0], rtol=1e-4, atol=1e-4)


def test_the_fewstep_workflow_samples_as_the_lora_was_trained_and_the_base_as_shipped():
    import sys
    from pathlib import Path

    from safetensors import safe_open

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fewstep import BASE_WORKFLOW, FEWSTEP_WORKFLOW, workflow_sampling

    base, no_lora = workflow_sampling(BASE_WORKFLOW)
    fewstep, lora = workflow_sampling(FEWSTEP_WORKFLOW)
    assert base == {"steps": 20, "cfg": 5.0, "shift": 5.0, "scheduler": "unipc", "denoise": 1.0} and no_lora is None
    assert lora == (BUILTIN_FEWSTEP_LORA, 1.0, "unmerged")
    with safe_open(str(WEIGHTS_DIR / FEWSTEP_LORA_FILE), "pt") as handle:
        trained_for = handle.metadata()["spacetime.fewstep"]
    assert trained_for == f"steps={fewstep['steps']} cfg={fewstep['cfg']:g} shift={fewstep['shift']} scheduler={fewstep['scheduler']}"
