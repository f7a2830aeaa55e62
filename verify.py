#!/usr/bin/env python3
"""Read the provenance of files the pack wrote (C2PA manifest and invisible watermark), without ComfyUI:

    python verify.py output/spacetime_t2v_00001_.mp4

Prints one line per file: manifest valid / tampered / absent, watermark present / absent with its bits.
"""
import sys

from spacetime_bootstrap import load_package

if __name__ == "__main__":
    load_package()
    from comfyui_spacetime.jobs.provenance.verify import main

    sys.exit(main())
