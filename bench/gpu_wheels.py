"""Make ``.gpu-wheels/``: the wheels a lent GPU machine lacks, for ``bench/gpu_check.py`` to install there.

The lent machines reach no package registry; their image has Python 3.12 with torch, transformers and
the scientific stack (the device tool's KINDS.md lists it). What the check needs beyond that is
resolved here for that interpreter and platform, the image's packages left out, downloaded, and cut
into loads that fit what one device call carries (64 MiB with the working tree): a wheel larger than
a load (ray's) travels in pieces that ``gpu_check.py`` joins before installing.

Run here: ``.venv/bin/python bench/gpu_wheels.py``. It prints the device calls to make; with one load
the check is a single call (``carry: [".gpu-wheels/1"]``).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu-wheels"
LOAD = 56 * 2**20  # one call's share for wheels: the working tree itself travels too
# what gpu_check.py imports beyond the image (versions as constraints.txt pins them)
WANT = ["omegaconf==2.4.0", "deepspeed==0.19.8", "diffusers==0.42.1", "open_clip_torch==3.3.0", "peft==0.21.2",
        "mlflow==3.17.2", "ray[default,serve]==2.60.0"]
# the device image's Python packages (the device tool's KINDS.md, read 2026-11-17)
PRESENT = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:",
            *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
              for a in ("--platform", p)]]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    import os

    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True,
                   env={**os.environ, **(env or {})})


def resolve(local: Path) -> list[str]:
    """``name==version`` of every package the check needs that the image lacks (deepspeed ships only a
    source archive: its wheel is built here first, pure Python, its ops left to be compiled where they run).
    The CUDA libraries the resolver picks for torch are left out: the image's torch brings its own."""
    # no cache: the wheel `make venv` built here carries a compiled op for this machine's Python
    pip("wheel", "--quiet", "--no-cache-dir", "--no-deps", "--no-build-isolation", "-w", str(local), WANT[1],
        env={"DS_BUILD_OPS": "0", "DS_BUILD_SHM_COMM": "0"})
    report = local / "report.json"
    pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "--target", str(local / "t"),
        "--find-links", str(local), *PLATFORM, *WANT)
    items = json.loads(report.read_text())["install"]
    return sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items
                  if norm(i["metadata"]["name"]) not in PRESENT and not norm(i["metadata"]["name"]).startswith("nvidia-"))


def loads(files: list[Path]) -> list[list[tuple[Path, int, int]]]:
    """Files (or byte ranges of a file larger than a load) packed into loads of at most LOAD bytes."""
    out: list[list[tuple[Path, int, int]]] = [[]]
    room = LOAD
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        size, start = f.stat().st_size, 0
        while start < size:
            if room == 0 or (size - start <= LOAD and size - start > room):
                out.append([])
                room = LOAD
            take = min(size - start, room)
            out[-1].append((f, start, take))
            start, room = start + take, room - take
    return [load for load in out if load]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        names = resolve(local)
        print(f"{len(names)} packages the image lacks: {' '.join(names)}", flush=True)
        dl = local / "dl"
        built = [w for w in local.glob("deepspeed-*.whl")]
        rest = [n for n in names if not n.lower().startswith("deepspeed==")]
        pip("download", "--quiet", "--no-deps", "-d", str(dl), *PLATFORM, *rest)
        files = sorted(dl.glob("*.whl")) + built
        plan = loads(files)
        if OUT.exists():
            subprocess.run(["rm", "-rf", str(OUT)], check=True)
        for i, load in enumerate(plan, 1):
            folder = OUT / str(i)
            folder.mkdir(parents=True)
            for f, start, take in load:
                whole = start == 0 and take == f.stat().st_size
                target = folder / (f.name if whole else f"{f.name}.part{start // LOAD:02d}")
                with open(f, "rb") as src, open(target, "wb") as dst:
                    src.seek(start)
                    dst.write(src.read(take))
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {total / 2**20:.1f} MiB in {len(plan)} load(s) of at most {LOAD / 2**20:.0f} MiB")
    for i in range(1, len(plan)):
        print(f"device call {i}: carry ['.gpu-wheels/{i}'], command: mkdir -p /tmp/w && cp .gpu-wheels/{i}/* /tmp/w/")
    last = len(plan)
    print(f"device call {last}{' (at once: the machine keeps /tmp/w only while it is warm)' if last > 1 else ''}: carry "
          f"['.gpu-wheels/{last}'], command: mkdir -p /tmp/w && cp .gpu-wheels/{last}/* /tmp/w/ && "
          "PARARL_WHEELS=/tmp/w timeout 540 python3 bench/gpu_check.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
