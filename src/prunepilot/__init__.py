"""prunepilot: find per-layer pruning ratios for a neural network under a resource budget.

The code lives in one folder per layer of the design (compression/, envs/, agents/, service/),
installed as ``prunepilot.compression`` and so on (here, src/prunepilot/<layer> are symlinks to them).
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `prunepilot.compress` without importing torch on `import prunepilot`
    if name in ("compress", "Compressed"):
        from prunepilot.service import compress as _compress

        return getattr(_compress, name)
    raise AttributeError(f"module 'prunepilot' has no attribute {name!r}")
