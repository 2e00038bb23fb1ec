"""`python -m turboquant_vllm.verify ...` is `turboquant-vllm verify ...` (see turboquant_vllm/cli/verify.py)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli.main import main as cli_main

    return cli_main(["verify", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
