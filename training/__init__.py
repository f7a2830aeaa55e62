"""Training the built-in tiny model: procedural videos with captions, the analytic detector that
scores generated videos, and the training script. Imports model_defs; nothing in the pack imports this."""
