"""How long the `prunepilot` command takes before it does anything: commands that need none of the
engine (help, keys, db, status of a job on a server) should not pay for importing torch.

Each command runs ``--repeats`` times in a fresh interpreter (as a user's shell runs it), against a
throwaway data directory; the table gives the median and the fastest wall time, and which of the
engine's heavy modules the CLI module itself imports.

    python benchmarks/cli_startup.py [--repeats 5]

Results: benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cli_startup.json"
HEAVY = ("torch", "torchvision", "timm", "torch_pruning", "onnx", "onnxruntime", "ray", "sqlalchemy")
COMMANDS = (["--help"], ["submit", "--help"], ["keys", "create", "--name", "bench"], ["keys", "list"], ["db", "current"])


def timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prunepilot.service.entry", *args], env=env, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    probe = f"import json, sys; import prunepilot.service.cli; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    heavy = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "PRUNEPILOT_DATA_DIR": data_dir}
        subprocess.run([sys.executable, "-m", "prunepilot.service.entry", "db", "upgrade"], env=env, check=True, capture_output=True)
        for command in COMMANDS:
            times = [timed(command, env) for _ in range(args.repeats)]
            rows.append({"command": "prunepilot " + " ".join(command), "median_s": statistics.median(times), "min_s": min(times)})
    print(f"heavy modules the CLI module imports: {', '.join(heavy) or 'none'}")
    print(f"{'command':40s} {'median s':>9s} {'min s':>7s}")
    for row in rows:
        print(f"{row['command']:40s} {row['median_s']:9.2f} {row['min_s']:7.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"repeats": args.repeats, "heavy_modules_imported": heavy, "rows": rows}, indent=2))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
