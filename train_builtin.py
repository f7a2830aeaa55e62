#!/usr/bin/env python3
"""Train the built-in tiny model: python train_builtin.py [--stages vae,decoder,dit] [--seed 0] (see training/train_builtin.py);
its few-step LoRA: python train_builtin.py fewstep [--seed 0] (see training/fewstep_lora.py)"""
import sys

from spacetime_bootstrap import load_package

if __name__ == "__main__":
    load_package()
    if sys.argv[1:2] == ["fewstep"]:
        from comfyui_spacetime.training.fewstep_lora import main

        main(sys.argv[2:])
    else:
        from comfyui_spacetime.training.train_builtin import main

        main()
