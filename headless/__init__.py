"""Running workflows without the ComfyUI server (the README's quick start and the tests)."""
