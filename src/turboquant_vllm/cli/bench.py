"""`turboquant-vllm bench attention|generate [options]`: run the GPU benchmark scripts of the repository.

The scripts live in the source repository (benchmarks/attention.py, benchmarks/generate.py), not in the
installed package: they are found next to this checkout (editable install), in $TURBOQUANT_BENCHMARKS, or
in ./benchmarks. Every option after the subcommand goes to the script's `main(argv)` unchanged, so
`turboquant-vllm bench generate --help` shows the script's own options (--quick, --smoke, --json PATH, ...).
The scripts print a tqdm progress bar over their cases and, with --json PATH, write their results there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

SCRIPTS = {
    "attention": "attention kernels: fused decode over the compressed cache vs SDPA, prefill, compress",
    "generate": "end-to-end decode tokens/s and memory, exact vs TQ4 fused / unfused, and the max batch",
}
ENV_DIR = "TURBOQUANT_BENCHMARKS"


def candidate_dirs() -> list[Path]:
    """Where benchmarks/ is looked for, in order."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    dirs.append(Path(__file__).resolve().parents[3] / "benchmarks")  # src/turboquant_vllm/cli -> repo root
    dirs.append(Path.cwd() / "benchmarks")
    return dirs


def find_script(name: str) -> Path | None:
    for d in candidate_dirs():
        path = d / f"{name}.py"
        if path.is_file():
            return path
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(SCRIPTS) + "}")
    for name, help_text in SCRIPTS.items():
        # prefix_chars="+" with no options: "--quick", "--help", ... are positional here, so every argument
        # reaches the script's own parser unchanged (argparse.REMAINDER alone rejects a leading option).
        sp = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}. Options: see `turboquant-vllm bench {name} --help` (the script's own).",
            add_help=False,
            prefix_chars="+",
        )
        sp.add_argument("script_args", nargs=argparse.REMAINDER, help="options of benchmarks/" + name + ".py")
        sp.set_defaults(bench_script=name)


def load_script(path: Path):
    """Import a benchmark script as a module (its folder on sys.path, for its `_common` helpers)."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    mod_name = f"turboquant_vllm_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def run(args: argparse.Namespace) -> int:
    name = args.bench_script
    path = find_script(name)
    if path is None:
        looked = ", ".join(str(d) for d in candidate_dirs())
        print(
            f"turboquant-vllm bench {name}: benchmarks/{name}.py not found (looked in: {looked}).\n"
            "The benchmark scripts ship with the source repository, not with the installed package: run this "
            "from a checkout of turboquant-vllm installed with `pip install -e .`, or set "
            f"{ENV_DIR}=/path/to/turboquant-vllm/benchmarks.",
            file=sys.stderr,
        )
        return 2
    try:
        module = load_script(path)
    except Exception as e:
        print(f"turboquant-vllm bench {name}: could not import {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    main = getattr(module, "main", None)
    if not callable(main):
        print(f"turboquant-vllm bench {name}: {path} defines no main(argv)", file=sys.stderr)
        return 2
    try:
        rc = main(list(args.script_args))
    except SystemExit as e:  # argparse --help / usage errors inside the script
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    return int(rc or 0)
