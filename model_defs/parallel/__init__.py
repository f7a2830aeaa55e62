"""Beyond one device: sequence parallelism (Ulysses all-to-all over heads, ring attention over the sequence, and
both at once: USP), CFG parallelism, FSDP-sharded DiT blocks and a split VAE decode, all on torch.distributed
(NCCL on GPUs, gloo on CPU). ``plan`` holds the one rule for how ranks are arranged; the other modules patch a
loaded model, so they compose with the rest of the pack's model transforms."""
