"""Our LoRA'd Wan DiT against diffusers' WanTransformer3DModel with the same LoRA loaded the diffusers way
(``WanLoraLoaderMixin.lora_state_dict``: its own conversion of each Hub format, then PEFT through
``load_lora_adapter``), one file per key format, unmerged and merged. Deltas diffusers leaves out (modulation,
norms, full Linear weight deltas: it logs and skips them) are added to the reference's weights by hand."""
import copy
import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from safetensors.torch import save_file

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeModel
from comfyui_spacetime.model_defs.lora import applied, read_lora
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_dit_state_dict, original_dit_name

SMALL = dict(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16, text_dim=20,
             freq_dim=32, ffn_dim=80, num_layers=2, cross_attn_norm=True, eps=1e-6)
CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)
FORMAT = LatentFormat(16, (0.0,) * 16, (1.0,) * 16)
BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
TOP_LINEARS = ["time_projection.1", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2"]
RANK = 4


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = WanTransformer3DModel(**SMALL).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 3, 6, 10, generator=generator), torch.tensor([999.0, 137.5]),
            torch.randn(2, 9, 20, generator=generator))


def _ours(reference) -> SpacetimeModel:
    dit = WanDiT(CONFIG, REFERENCE).eval()
    dit.load_state_dict(convert_diffusers_dit_state_dict(reference.state_dict()))
    return SpacetimeModel(dit, FORMAT, "tiny_wan.safetensors")


def _low_rank(dit: WanDiT, names, generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down [r, in], up [out, r]) per Linear layer, large enough to move the output well past 1e-5."""
    pairs = {}
    for name in names:
        layer = dit.get_submodule(name)
        pairs[name] = (torch.randn(RANK, layer.in_features, generator=generator) * 0.1,
                       torch.randn(layer.out_features, RANK, generator=generator) * 0.1)
    return pairs


def _block_names(prefixes=BLOCK_LINEARS):
    return [f"blocks.{i}.{name}" for i in range(CONFIG.num_layers) for name in prefixes]


def _diffusers_names(reference) -> dict[str, str]:
    """Our Linear names -> diffusers'."""
    names = {}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            try:
                names[original_dit_name(name)] = name
            except KeyError:
                pass
    return names


def kohya(dit, reference, generator):
    """ComfyUI / kohya / musubi-tuner: flat names, ``.alpha`` (alpha / rank = 2)."""
    tensors = {}
    for name, (down, up) in _low_rank(dit, _block_names(), generator).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(8.0)}
    return tensors, {}, {}


def peft(dit, reference, generator):
    """diffusers / PEFT: ``transformer.<diffusers name>.lora_A/B``, lora_alpha 2 x rank in the adapter metadata."""
    theirs = _diffusers_names(reference)
    names = _block_names() + TOP_LINEARS + ["head.head"]
    tensors = {}
    for name, (down, up) in _low_rank(dit, names, generator).items():
        tensors |= {f"transformer.{theirs[name]}.lora_A.weight": down, f"transformer.{theirs[name]}.lora_B.weight": up}
    config = {"transformer.r": RANK, "transformer.lora_alpha": 2 * RANK,
              "transformer.target_modules": sorted(theirs[name] for name in names)}
    return tensors, {"lora_adapter_metadata": json.dumps(config)}, {}


def original(dit, reference, generator):
    """Original / musubi names under ``diffusion_model.``, alpha on the blocks' layers."""
    tensors = {}
    for name, (down, up) in _low_rank(dit, _block_names() + TOP_LINEARS, generator).items():
        key = f"diffusion_model.{name}"
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        if name.startswith("blocks."):
            tensors[f"{key}.alpha"] = torch.tensor(2.0)  # alpha / rank = 0.5
    return tensors, {}, {}


def deltas(dit, reference, generator):
    """A distillation LoRA's shape (lightx2v, CausVid): low-rank terms with bias deltas (``diff_b``), full weight
    deltas (``diff``) of the head and one FFN layer, and deltas of the modulations and norm weights."""
    tensors, by_hand = {}, {}
    for name, (down, up) in _low_rank(dit, _block_names() + ["time_projection.1"], generator).items():
        key = f"diffusion_model.{name}"
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.diff_b": torch.randn(up.shape[0], generator=generator) * 0.1}
    head = dit.head.head
    tensors["diffusion_model.head.head.diff"] = torch.randn_like(head.weight) * 0.1
    tensors["diffusion_model.head.head.diff_b"] = torch.randn_like(head.bias) * 0.1
    # what diffusers skips: applied to the reference's own weights here
    theirs = convert_diffusers_dit_state_dict({k: k for k in reference.state_dict()})  # ours -> diffusers
    for name in ["blocks.0.modulation", "blocks.1.modulation", "head.modulation", "blocks.0.norm3.weight",
                 "blocks.1.self_attn.norm_q.weight", "blocks.0.ffn.2.weight"]:
        delta = torch.randn_like(dit.get_parameter(name)) * 0.1
        tensors[f"diffusion_model.{name.removesuffix('.weight')}.diff"] = delta
        by_hand[theirs[name]] = delta
    return tensors, {}, by_hand


FORMATS = {"kohya": kohya, "peft": peft, "original": original, "diff": deltas}


@pytest.mark.parametrize("name", list(FORMATS))
def test_lora_forward_matches_diffusers(reference, inputs, tmp_path, name):
    model = _ours(reference)
    tensors, metadata, by_hand = FORMATS[name](model.dit, reference, torch.Generator().manual_seed(2))
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata or None)

    theirs = copy.deepcopy(reference)
    with torch.no_grad():
        for key, delta in by_hand.items():
            theirs.get_parameter(key).add_(delta.view_as(theirs.get_parameter(key)))
    state_dict, lora_metadata = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    theirs.load_lora_adapter(state_dict, prefix="transformer", metadata=lora_metadata, adapter_name="test")
    lora = read_lora(path)
    with torch.no_grad():
        expected = theirs(*inputs, return_dict=False)[0]
        base = model.dit(*inputs)
        errors = {}
        for mode in ("unmerged", "merged"):
            with applied(model.dit, model.with_lora(lora, 1.0, mode).loras):
                errors[mode] = (model.dit(*inputs) - expected).abs().max().item()
    print(f"LoRA format {name}: max error vs diffusers {errors}, LoRA effect {(expected - base).abs().max().item():.3f}")
    assert (expected - base).abs().max() > 1e-2  # the LoRA changes the output well beyond the tolerance
    assert max(errors.values()) <= 1e-5, errors
