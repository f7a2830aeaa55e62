"""Hub download node: repo id + file -> the right ComfyUI models folder (the only node that uses the network)."""
from __future__ import annotations

from ..model_defs.hub import download_file, validate_request
from . import comfy_glue

FOLDERS = ["diffusion_models", "vae", "text_encoders", "clip_vision"]


class SpacetimeHubDownload:
    DESCRIPTION = (
        "Downloads one model file from the Hugging Face Hub into a ComfyUI models folder (resumable, verified by "
        "size and sha256). Honours HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE. Refresh the browser afterwards to see it in the loaders."
    )
    CATEGORY = "spacetime/loaders"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file_name",)
    FUNCTION = "download"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "repo_id": ("STRING", {"default": "Comfy-Org/Wan_2.1_ComfyUI_repackaged", "tooltip": "owner/name on the Hub."}),
                "filename": ("STRING", {"default": "split_files/vae/wan_2.1_vae.safetensors", "tooltip": "Path of the file inside the repo."}),
                "folder": (FOLDERS, {"default": "vae", "tooltip": "The ComfyUI models folder to put it in."}),
                "revision": ("STRING", {"default": "main", "tooltip": "Branch, tag or commit."}),
            },
            "optional": {
                "subfolder": ("STRING", {"default": "", "tooltip": "A sub-folder of the models folder, e.g. umt5-xxl for the umT5 tokenizer files."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, repo_id=None, filename=None, subfolder=None):
        """Before anything runs (ComfyUI calls it with these inputs; None when linked, known only later)."""
        try:
            validate_request(repo_id, filename, subfolder)
        except ValueError as exc:
            return str(exc)
        return True

    def download(self, repo_id: str, filename: str, folder: str, revision: str = "main", subfolder: str = ""):
        if folder not in FOLDERS:
            raise ValueError(f"folder={folder!r} is not allowed; allowed values: {FOLDERS}")
        on_progress = comfy_glue.progress_callback(f"downloading {filename}")
        path = download_file(repo_id, filename, comfy_glue.download_folder(folder), revision or "main", on_progress, subfolder)
        return {"ui": {"text": [str(path)]}, "result": (path.name,)}
