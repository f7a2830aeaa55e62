"""Prompt extension (issue 22, item 1): a short prompt -> a detailed one in the style video models are trained on
(Sora's "re-captioning" step; Wan ships the same with Qwen instruct models), by a local instruct LLM through
transformers or by any OpenAI-compatible chat endpoint the user runs (Ollama, llama.cpp server, vLLM).

The system prompts are ours, written in the spirit of Wan 2.1's (``wan/utils/prompt_extend.py`` in
Wan-Video/Wan2.1: ``LM_EN_SYS_PROMPT`` for text-to-video, ``VL_EN_SYS_PROMPT`` for image-to-video): keep every
detail the user gave, add subject, appearance, motion, setting, light and camera; one paragraph, no commentary.
A local model samples under its own seeded generator: the same seed gives the same prompt on one device.
"""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEM_PROMPTS = {
    "t2v": (
        "You rewrite short requests for a text-to-video model into one detailed English description of the video. "
        "Keep everything the user asked for: subject, count, colour, action, style, and any quoted text. Add what the "
        "request leaves open and a video needs: the subject's appearance, what moves and how (direction, speed), "
        "the setting and background, the light, and the camera (shot size, angle, movement). Describe what is seen, "
        "in present tense, as one paragraph of 80 to 120 words. Do not invent a story, do not explain, do not use "
        "lists or quotes around the answer. Answer with the description only."
    ),
    "i2v": (
        "You rewrite short requests for an image-to-video model into one detailed English description of the video "
        "that starts from the given image. The image's caption says what the first frame shows: keep its subject, "
        "colours, setting and style unchanged, and describe what moves from there, as the request asks: the motion "
        "(direction, speed), how the subject and background change, and the camera movement. Describe what is seen, "
        "in present tense, as one paragraph of 60 to 100 words. Answer with the description only."
    ),
}
MODES = tuple(SYSTEM_PROMPTS)
LLM_FOLDER = "LLM"  # models/LLM/<model folder>, the folder ComfyUI's LLM node packs use for transformers models


@dataclass(frozen=True)
class Extension:
    """The extended prompt and a one-line note (what happened: truncated, passed through, ...; "" when nothing)."""

    prompt: str
    note: str = ""


def user_message(prompt: str, mode: str, image_caption: str = "") -> str:
    if mode not in SYSTEM_PROMPTS:
        raise ValueError(f"mode={mode!r} is not allowed; allowed values: {list(MODES)}")
    if mode == "i2v" and image_caption.strip():
        return f"Image caption: {image_caption.strip()}\nRequest: {prompt.strip()}"
    return prompt.strip()


def finish(text: str, hit_limit: bool, max_new_tokens: int) -> Extension:
    """The answer cleaned (quotes, blank lines); an empty one is a ValueError; one cut by the token limit is
    truncated at its last full sentence and says so."""
    answer = " ".join(text.split()).strip().strip('"').strip()
    if not answer:
        raise ValueError("the LLM's answer is empty")
    if hit_limit:
        end = max(answer.rfind(". "), answer.rfind("! "), answer.rfind("? "))
        cut = answer[: end + 1] if end > 0 else answer
        if answer[-1] in ".!?":
            cut = answer
        return Extension(cut, f"the LLM's answer reached max_new_tokens={max_new_tokens}: truncated to its last full sentence")
    return Extension(answer)


def extend_local(model_dir: Path, prompt: str, mode: str, seed: int, max_new_tokens: int, image_caption: str = "") -> Extension:
    """Extend with the transformers causal LM in ``model_dir`` (config, weights as safetensors, tokenizer), on the
    CPU or the best device; sampling (temperature 0.7, top-p 0.9) under a generator seeded with ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"local_model={model_dir.name!r}: {model_dir} holds no model (config.json missing); allowed: a "
                         "transformers instruct model folder (e.g. Qwen2.5-3B-Instruct) with config.json, *.safetensors and tokenizer files")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True).eval()
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[mode]}, {"role": "user", "content": user_message(prompt, mode, image_caption)}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(f"{messages[0]['content']}\n\nRequest: {messages[1]['content']}\nDescription:", return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)  # inside fork_rng: the process's own random state is left as it was
        out = model.generate(ids.to(device), do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:]
    ended = tokenizer.eos_token_id is not None and bool((new == tokenizer.eos_token_id).any())
    text = tokenizer.decode(new.tolist(), skip_special_tokens=True)
    return finish(text, hit_limit=not ended and len(new) >= max_new_tokens, max_new_tokens=max_new_tokens)


def extend_endpoint(url: str, model: str, prompt: str, mode: str, seed: int, max_new_tokens: int, image_caption: str = "",
                    timeout: float = 120.0) -> Extension:
    """Extend through an OpenAI-compatible server: POST ``<url>/v1/chat/completions`` (``url`` may already end in
    ``/v1``). An unreachable server or an answer of the wrong shape is a one-line ValueError naming the URL."""
    base = url.rstrip("/")
    target = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
    body = {"model": model, "seed": seed, "temperature": 0.7, "top_p": 0.9, "max_tokens": max_new_tokens, "messages": [
        {"role": "system", "content": SYSTEM_PROMPTS[mode]}, {"role": "user", "content": user_message(prompt, mode, image_caption)}]}
    request = urllib.request.Request(target, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise ValueError(f"endpoint_url={url!r}: the server answered HTTP {exc.code} ({exc.reason}) to {target}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"endpoint_url={url!r}: unreachable ({reason}); allowed: the URL of a running OpenAI-compatible "
                         "server, e.g. http://127.0.0.1:11434 (Ollama) or http://127.0.0.1:8080 (llama.cpp)") from None
    except json.JSONDecodeError:
        raise ValueError(f"endpoint_url={url!r}: the answer from {target} is not JSON") from None
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"endpoint_url={url!r}: the answer from {target} has no choices[0].message.content") from None
    return finish(text, hit_limit=choice.get("finish_reason") == "length", max_new_tokens=max_new_tokens)
