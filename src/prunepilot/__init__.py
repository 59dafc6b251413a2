"""prunepilot: find per-layer pruning ratios for a neural network under a resource budget.

The code lives in one folder per layer of the design (compression/, envs/, agents/, service/),
installed as ``prunepilot.compression`` and so on (here, src/prunepilot/<layer> are symlinks to them).
"""

__version__ = "0.1.0"
