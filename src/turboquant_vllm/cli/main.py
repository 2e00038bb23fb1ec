"""`turboquant-vllm` console script: demo | verify | bench | distortion."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turboquant-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from . import demo

    p = sub.add_parser("demo", help="compress a model's KV cache on the CPU; print memory saved and fidelity")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    try:
        from . import verify
    except ImportError:  # pragma: no cover - optional pieces
        verify = None
    if verify is not None:
        p = sub.add_parser("verify", help="measure whether a model keeps its quality at a bit width")
        verify.add_arguments(p)
        p.set_defaults(func=verify.run)

    try:
        from . import bench
    except ImportError:  # pragma: no cover
        bench = None
    if bench is not None:
        p = sub.add_parser("bench", help="GPU benchmarks: attention kernels and generate()")
        bench.add_arguments(p)
        p.set_defaults(func=bench.run)

    from . import distortion

    p = sub.add_parser("distortion", help="distortion vs bits against the paper's bounds (CPU)")
    distortion.add_arguments(p)
    p.set_defaults(func=distortion.run)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
