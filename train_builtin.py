#!/usr/bin/env python3
"""Train the built-in tiny model: python train_builtin.py [--stages vae,decoder,dit] [--seed 0] (see training/train_builtin.py)"""
from spacetime_bootstrap import load_package

if __name__ == "__main__":
    load_package()
    from comfyui_spacetime.training.train_builtin import main

    main()
