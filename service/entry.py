"""The ``prunepilot`` command. ``prunepilot device-agent`` runs without the rest of the CLI, whose
imports (torch, typer, rich, the engine) a device with the agent's minimal install does not have."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["device-agent"]:
        from .device_agent import main as agent_main

        sys.exit(agent_main(sys.argv[2:]))
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
