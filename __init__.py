"""ComfyUI-Spacetime: Sora-style spacetime-patch video diffusion (Wan 2.1 architecture) for ComfyUI.

ComfyUI imports this folder as a package and reads the two mappings below. Importing it needs no
ComfyUI, no GPU, no triton and no network.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
