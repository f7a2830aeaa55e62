"""Spacetime Extend Prompt: a short prompt -> a detailed one, by a local LLM or an OpenAI-compatible endpoint."""
from __future__ import annotations

import logging

from ..jobs.builtin_prompt import builtin_caption
from ..jobs.prompt_extension import LLM_FOLDER, MODES, Extension, extend_endpoint, extend_local
from . import comfy_glue
from .widgets import SEED, validate_inputs

log = logging.getLogger(__name__)
BACKENDS = ("local", "endpoint", "built-in")
ON_ERROR = ("fail", "pass through")
NO_MODEL = "(no model in models/LLM)"


def _local_models() -> list[str]:
    return comfy_glue.list_model_dirs(LLM_FOLDER) or [NO_MODEL]


class SpacetimeExtendPrompt:
    CATEGORY = "spacetime/conditioning"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "note")
    FUNCTION = "extend"
    DESCRIPTION = "Rewrites a short prompt into the long, descriptive kind video models are trained on (as Wan's prompt extension does)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "a red ball rolls left"}),
                "mode": (list(MODES), {"default": "t2v", "tooltip": "t2v: text-to-video; i2v: the video starts from an image (give its caption)."}),
                "backend": (list(BACKENDS), {"default": "local", "tooltip": "local: a transformers model folder in models/LLM "
                                                                            "(Qwen2.5-3B/7B-Instruct, as Wan's tool uses); endpoint: an OpenAI-compatible server; "
                                                                            "built-in: the built-in model's words (no LLM)."}),
                "local_model": (_local_models(), {"tooltip": "A folder in models/LLM with config.json, *.safetensors and the tokenizer files."}),
                "endpoint_url": ("STRING", {"default": "http://127.0.0.1:11434", "tooltip": "Ollama, llama.cpp server or vLLM: their base URL."}),
                "endpoint_model": ("STRING", {"default": "qwen2.5:7b-instruct", "tooltip": "The model name the endpoint serves."}),
                "seed": SEED,
                "max_new_tokens": ("INT", {"default": 256, "min": 16, "max": 4096, "tooltip": "Longer answers are cut at their last full sentence."}),
                "on_error": (list(ON_ERROR), {"default": "fail", "tooltip": "pass through: on any failure, output the prompt unchanged and say why in note."}),
            },
            "optional": {"image_caption": ("STRING", {"multiline": True, "default": "", "tooltip": "i2v: what the starting image shows."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        return validate_inputs(cls, {k: v for k, v in values.items() if k != "local_model"}, _prompt_rule)

    def extend(self, prompt, mode, backend, local_model, endpoint_url, endpoint_model, seed, max_new_tokens, on_error, image_caption=""):
        try:
            if backend == "built-in":
                result = Extension(*builtin_caption(prompt))
            elif backend == "local":
                path = comfy_glue.model_dir_path(LLM_FOLDER, "" if local_model == NO_MODEL else local_model, "local_model")
                result = extend_local(path, prompt, mode, seed, max_new_tokens, image_caption)
            else:
                result = extend_endpoint(endpoint_url, endpoint_model, prompt, mode, seed, max_new_tokens, image_caption)
        except (ValueError, OSError) as exc:
            if on_error != "pass through":
                raise
            result = Extension(prompt, f"prompt passed through unchanged: {exc}")
        if result.note:
            log.warning("Spacetime Extend Prompt: %s", result.note)
        return (result.prompt, result.note)


def _prompt_rule(values: dict) -> None:
    (prompt,) = [values["prompt"]]
    if not prompt.strip():
        raise ValueError("prompt: empty; allowed: a short description of the video to extend")
