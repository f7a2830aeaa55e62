"""Spacetime Multi-GPU: a model in, the same model run on several devices out (``jobs.parallel``)."""
from __future__ import annotations

from ..jobs.parallel import EXAMPLES, make_plan, parallel_model, parse_devices
from .widgets import literal_values, validate_inputs


def _devices_rule(values: dict) -> None:
    (devices,) = literal_values(values, "devices")
    parse_devices(devices)


def _degrees_rule(values: dict) -> None:
    """The degrees against the device count (the heads are checked once the model is known)."""
    devices, ulysses, ring, cfg_parallel, fsdp = literal_values(values, "devices", "ulysses", "ring", "cfg_parallel", "fsdp")
    make_plan(ulysses, ring, cfg_parallel, fsdp).check(len(parse_devices(devices)))


class SpacetimeMultiGPU:
    DESCRIPTION = (
        "Runs the model on several devices, one process each: the video's tokens are shared out over the ranks (Ulysses "
        "splits the attention heads, ring passes key/value blocks around), cfg_parallel computes the positive and the "
        "negative pass on two ranks, fsdp spreads the weights. ulysses x ring x (2 if cfg_parallel) must equal the device "
        "count. The workers keep the weights between runs. Connect LoRAs and Pair Experts before this node. Under "
        "torchrun (headless), the processes torchrun started are the ranks."
    )
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("SPACETIME_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SPACETIME_MODEL",),
                "devices": ("STRING", {
                    "default": "cpu x2",
                    "tooltip": f"One process per device: e.g. {EXAMPLES} ('cuda x4' is cuda:0 to cuda:3). The ranks meet on a "
                               "free loopback port the OS picks (set SPACETIME_PARALLEL_PORT to fix one).",
                }),
                "ulysses": ("INT", {
                    "default": 1, "min": 1, "max": 64,
                    "tooltip": "Ranks that split the attention heads (all-to-all); must divide the model's heads (Wan 1.3B: 12, "
                               "14B: 40, built-in: 3).",
                }),
                "ring": ("INT", {
                    "default": 2, "min": 1, "max": 64,
                    "tooltip": "Ranks that pass key/value blocks around a ring (any head count).",
                }),
                "cfg_parallel": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "The positive and negative guidance passes on two halves of the ranks (doubles the rank count).",
                }),
                "fsdp": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Shard the DiT blocks' weights over all ranks (gathered block by block): for models larger than one GPU.",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, values, _devices_rule, _degrees_rule)

    def apply(self, model, devices: str, ulysses: int, ring: int, cfg_parallel: bool, fsdp: bool):
        return (parallel_model(model, devices, make_plan(ulysses, ring, cfg_parallel, fsdp)),)
