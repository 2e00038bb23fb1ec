"""Shared helpers of the benchmark scripts: environment header, timing, copy bandwidth, result tables.

Kept small and generic (no turboquant imports, triton imported lazily) so that every script can use it:

    env_header() -> dict                    device, SM count, memory, versions, date/time (UTC)
    do_bench(fn, warmup=25, rep=100) -> ms  median; triton.testing.do_bench on CUDA, a timed loop on CPU
    copy_bandwidth(device) -> bytes/s       device-to-device copy of 1 GiB, read + written bytes per second
    print_table(rows, columns)              fixed-width table on stdout (missing keys print as "-")
    write_results(rows, out_dir, name, env=...)   <out_dir>/<name>.json and <name>.md
    default_out_dir()                       $OUT if set, else benchmarks/out
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

GiB = 1 << 30


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # pragma: no cover - missing optional package
        return f"unavailable ({type(e).__name__})"
    return str(getattr(mod, "__version__", "?"))


def env_header(device: str | torch.device | None = None) -> dict:
    """Where and with what the numbers were taken: device, memory, versions, date/time (UTC)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    h = {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host_python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "turboquant_vllm": _version("turboquant_vllm"),
        "device": str(dev),
    }
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        free, total = torch.cuda.mem_get_info(idx)
        h.update(
            gpu=p.name,
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            memory_GiB=round(total / GiB, 2),
            free_GiB_at_start=round(free / GiB, 2),
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
            gpus_visible=torch.cuda.device_count(),
        )
    else:
        h.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    for var in ("TRITON_INTERPRET", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var):
            h[var] = os.environ[var]
    return h


def synchronize(device: str | torch.device | None = None) -> None:
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        torch.cuda.synchronize(dev)


def do_bench(fn, warmup: int = 25, rep: int = 100, device: str | torch.device | None = None) -> float:
    """Median milliseconds of `fn()`.

    CUDA: triton.testing.do_bench (warmup / rep are milliseconds, L2 flushed between calls).
    CPU: a timed loop of about `rep` ms after about `warmup` ms, at least 3 calls.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    t_end = time.perf_counter() + warmup / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _copy_ms(dev: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), device=dev)


def copy_bandwidth(device: str | torch.device = "cuda", nbytes: int = GiB) -> float:
    """Measured device-to-device copy bandwidth: bytes read + written per second (median of do_bench)."""
    dev = torch.device(device)
    ms = _copy_ms(dev, nbytes)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def start_gpu_script() -> bool:
    """Common start of the one-off GPU scripts: warnings off; without a CUDA GPU say so and return False;
    else print the device, torch, Triton and the UTC date (the header of every raw result) and return True."""
    import warnings

    import triton

    warnings.filterwarnings("ignore")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return False
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, _dt.datetime.now(_dt.UTC), flush=True)
    return True


def default_out_dir() -> str:
    return os.environ.get("OUT") or str(Path(__file__).resolve().parent / "out")


def fmt(value) -> str:
    """Compact cell text: floats to 3-4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{value:.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        if a >= 1e-3:
            return f"{value:.4f}"
        return f"{value:.2e}"
    return str(value)


def _columns(rows: list[dict], columns: list[str] | None) -> list[str]:
    if columns:
        return list(columns)
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def table_lines(rows: list[dict], columns: list[str] | None = None, max_width: int = 60) -> list[str]:
    """Fixed-width text table; a cell longer than max_width is cut with '...'."""
    cols = _columns(rows, columns)

    def cell(r, c):
        s = fmt(r.get(c)).replace("\n", " ")
        return s if len(s) <= max_width else s[: max_width - 3] + "..."

    cells = [[cell(r, c) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return lines


def print_table(rows: list[dict], columns: list[str] | None = None, file=None, max_width: int = 60) -> None:
    """Print rows as a fixed-width table (columns: the keys to show, in order; default every key)."""
    out = file if file is not None else sys.stdout
    for line in table_lines(rows, columns, max_width):
        print(line, file=out)
    out.flush()


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "/").replace("\n", " ") for c in cols) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return path


def write_results(
    rows: list[dict],
    out_dir: str | Path,
    name: str,
    *,
    env: dict | None = None,
    columns: list[str] | None = None,
    summary: list[str] | None = None,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write <out_dir>/<name>.json ({"env", "rows", "summary", **extra}) and <name>.md (header + table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env or {}, "rows": rows, "summary": summary or []}
    payload.update(extra or {})
    jpath = write_json(out / f"{name}.json", payload)
    md = [f"# {name}", ""]
    if env:
        md += [f"- {k}: {v}" for k, v in env.items()] + [""]
    md += [markdown_table(rows, columns), ""]
    if summary:
        md += [f"- {s}" for s in summary] + [""]
    mpath = out / f"{name}.md"
    mpath.write_text("\n".join(md))
    return jpath, mpath


class Progress:
    """tqdm over the work items (a no-op stand-in when tqdm is missing or disabled)."""

    def __init__(self, total: int, enabled: bool, desc: str = "bench"):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="case", mininterval=2.0, file=sys.stderr)
            except Exception:  # pragma: no cover
                self.bar = None

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
        sys.stdout.flush()

    def step(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(desc, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------ plots
def add_plot_arguments(p, what: str) -> None:
    """--plot PNG (draw `what` after the run) and --plot-from JSON (only redraw saved results, no GPU)."""
    p.add_argument("--plot", metavar="PNG", help=f"also draw {what.replace('%', '%%')} here")  # argparse formats %
    p.add_argument("--plot-from", metavar="JSON", help="only draw --plot from a saved result file (no GPU needed)")


def plot_only(p, args, draw) -> int:
    """The --plot-from run: draw(load_results(args.plot_from), args.plot); bad input is a usage error."""
    if not args.plot:
        p.error("--plot-from needs --plot PNG")
    try:
        print(f"wrote {draw(load_results(args.plot_from, p.prog), args.plot)}")
    except (OSError, ValueError) as e:
        p.error(str(e))
    return 0


def load_results(path: str | Path, script: str) -> dict:
    """A saved result file ({"env", "rows", ...} of write_results or --json) of benchmarks/<script>."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no result file at {p}")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{p} holds no 'rows' (not a {script} result)")
    return data


def save_figure(fig, path: str | Path, env: dict, keys: tuple[str, ...], rect: tuple) -> Path:
    """Stamp the environment's `keys` in the corner, lay out within `rect`, write the PNG, close the figure."""
    import matplotlib.pyplot as plt

    stamp = ", ".join(f"{k} {env[k]}" for k in keys if k in env)
    fig.text(0.01, 0.005, stamp, fontsize=7, color="0.4")
    fig.tight_layout(rect=rect)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
