"""Model definitions: torch modules, configs, checkpoint loading and sampling. Imports no ComfyUI."""
