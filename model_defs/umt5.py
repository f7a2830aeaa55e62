"""umT5-XXL, Wan's text encoder, through transformers' ``UMT5EncoderModel``, loaded from a
.safetensors file (ComfyUI's ``umt5_xxl_fp16.safetensors`` or diffusers' ``text_encoder/``) with its
tokenizer from local files only. Wan's original ``.pth`` is a pickle and is refused by the reader.

As Wan does, prompts are tokenized to at most 512 tokens and the hidden states past each prompt's
last token are zeroed (Wan cuts them and pads with zeros to 512).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, wrong_family_error, detect_family, read_checkpoint, strip_prefix
from .fp8 import dequantize_fp8
from .text_encoders import EncodedText, encode_prompts

UMT5_TEXT_LEN = 512
UMT5_TOKENIZER_DIR = "umt5-xxl"  # inside the text_encoders folder
UMT5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
UMT5_TOKENIZER_SOURCE = "google/umt5-xxl"


def _config_from_state_dict(state_dict: dict[str, torch.Tensor]):
    from transformers import UMT5Config

    vocab, d_model = state_dict["shared.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.block."))
    num_heads = state_dict["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    inner = state_dict["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, num_heads=num_heads, num_layers=layers,
        d_ff=state_dict["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=state_dict[
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[0],
        is_encoder_decoder=False, use_cache=False,
    )


def check_tokenizer_dir(folder: Path) -> None:
    missing = [name for name in UMT5_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The umT5 tokenizer is missing {missing} in {folder}. Download them from the Hub repo "
            f"{UMT5_TOKENIZER_SOURCE} into that folder (e.g. with the 'Spacetime Download From Hub' node, "
            f"folder text_encoders, subfolder {UMT5_TOKENIZER_DIR})."
        )


class UMT5TextEncoder:
    """Wan's umT5-XXL encoder (dim 4096, 512 tokens)."""

    text_len = UMT5_TEXT_LEN

    def __init__(self, weights: str | Path, tokenizer_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
        from transformers import AutoTokenizer, UMT5EncoderModel

        weights, tokenizer_dir = Path(weights), Path(tokenizer_dir)
        check_tokenizer_dir(tokenizer_dir)
        state_dict, _ = read_checkpoint(weights, dtype)
        state_dict = strip_prefix(state_dict)
        if detect_family(state_dict) != "umT5 text encoder":
            raise wrong_family_error(weights.name, "umT5 text encoder", state_dict)
        state_dict = dequantize_fp8(state_dict, dtype)  # also drops ComfyUI's fp8 scale entries
        state_dict.setdefault("encoder.embed_tokens.weight", state_dict["shared.weight"])  # tied in the model
        config = _config_from_state_dict(state_dict)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        try:
            model.load_state_dict(state_dict, assign=True, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights.name} does not match the umT5 encoder layout: {exc}") from exc
        model.encoder.embed_tokens = model.shared  # keep the tie after assignment
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.name = weights.name
        self.dim = config.d_model

    def encode(self, prompts: list[str], text_len: int) -> EncodedText:
        return encode_prompts(self.tokenizer, self.model, prompts, text_len, UMT5_TEXT_LEN)
