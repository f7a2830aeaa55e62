"""Training the built-in tiny model. Imports model_defs; nothing in the pack imports this.

procedural.py (captioned procedural videos) → clips.py (pools of them as arrays and video tensors) →
metrics.py (reconstruction PSNR), lr_schedule.py → vae_stages.py, dit_stage.py (the training stages) →
train_builtin.py (the script: flags and stage order). detector.py scores generated videos;
caption_probe.py measures whether a DiT reads its captions' words."""
