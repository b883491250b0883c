"""vLLM's own Python code for the fake engine, without a CUDA build or a CUDA torch.

`real_vllm_paths()` returns sys.path entries holding vLLM's pure-Python files (extracted from
its wheel, fetched with `pip download --no-deps`) and the few pure packages its msgpack
serializer imports (installed with `pip install --no-deps --target`), in a cache folder
outside the venv: nothing here can pull a torch. Built once per machine (~20 s), then reused.
Only a child process (tests/fake_vllm.py) puts them on its path, so the test process never
sees a half-installed vLLM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The newest release in the supported range (evaluators/vllm.py SUPPORTED_VLLM).
VLLM_VERSION = "0.33.0"
# What `import vllm.v1.serial_utils` needs beyond this venv, at the versions it was checked with.
SERIALIZER_DEPS = (
    "msgspec==0.23.0",
    "pyzmq==27.3.0",
    "cbor2==6.3.0",
    "openai==3.57.0",
    "openai-harmony==0.0.8",
    "sniffio==1.3.1",
    "pybase64==1.5.1",
    "cachetools==8.0.2",
    "uvloop==0.23.0",
    "py-cpuinfo==9.0.0",
)


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergetune" / f"vllm-{VLLM_VERSION}-py"
    return Path(os.environ.get("MERGETUNE_VLLM_PY_CACHE", default))


def real_vllm_paths() -> list[str]:
    """[vLLM's source root, its serializer's dependencies], built on first use."""
    root = cache_dir()
    if not (root / "complete").is_file():
        _build(root)
    return [str(root / "src"), str(root / "deps")]


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args[:2])} failed (vLLM's Python files are fetched from PyPI):\n{result.stderr[-2000:]}")


def _build(root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        wheels = staging / "wheel"
        _pip("download", "--no-deps", "--dest", str(wheels), f"vllm=={VLLM_VERSION}")
        (wheel,) = wheels.glob("vllm-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith("vllm/") and m.endswith(".py")]
            archive.extractall(staging / "src", members)
        shutil.rmtree(wheels)
        _pip("install", "--no-deps", "--target", str(staging / "deps"), *SERIALIZER_DEPS)
        (staging / "complete").write_text(VLLM_VERSION + "\n")
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
