"""The study's numbers as a function of config, code and seed only (config key `numerics`).

Two things besides those decide float32 results on a CPU, and `portable` (the default) pins both:

- **Which kernels run.** torch, MKL and oneDNN each pick vector kernels by the CPU (AVX2 or
  AVX-512), which round differently. Portable exports the AVX2 level for all three before torch is
  imported (`CPU_PINS`; MKL's conditional numerical reproducibility in its strict mode also keeps
  matrix products the same at any thread count), so any x86-64 CPU with AVX2 runs the same code.
  MKL honours its AVX2 branch only where it finds an Intel CPU: elsewhere it silently runs its
  AUTO branch, whose products and vector maths (sqrt, exp, log) round otherwise. So on another
  vendor's CPU portable preloads a one-function library that answers MKL's vendor check with
  yes (`MKL_VENDOR_SHIM`, built once with the C compiler), and every job checks that MKL runs the
  AVX2 branch (`configure_torch`).
- **How many threads share a reduction.** Measured on every aten operation of training and
  gradient extraction (default model size and SmolLM2-135M's) and of generation (default size),
  1 thread against 2 on the same inputs: one operation gave other bits, torch's CPU softmax backward
  (the attention's), for rows longer than one vector whose length is not a multiple of it (every
  length >= 9 not a multiple of 8, at 2, 3 or 4 threads). Portable pads every batch to a multiple
  of `PAD_MULTIPLE` tokens, so those rows never occur. The extra tokens are padding: masked out of
  attention and unlabelled, they change no result beyond rounding.

Outside torch, numpy picks vector kernels by CPU too: its OpenBLAS products and its AVX-512 log
and exp. So float64 products of stored gradients go through torch's pinned MKL
(`tdabench.metrics.matmul64`) and BM25 takes `math.log`; numpy's sums and elementwise arithmetic
round the same on any x86-64 CPU.

On CUDA, portable also asks torch for deterministic algorithms, a fixed cuBLAS workspace and no
TF32. `native` keeps the host's fastest kernels and unpadded batches: results may then differ by
CPU kind and by thread count.

Jobs call `pin_environment` before torch is imported (workflow/scripts/stage.py) and
`configure_torch` after; library code reads the active mode through `token_multiple`, which is
native (no padding) unless a job set it. Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from contextlib import contextmanager
from pathlib import Path

from tdabench.errors import StudyError

MODES = ("portable", "native")
# Exported before torch is imported. ATEN: torch's own vector kernels; MKL_CBWR: MKL's code path
# (STRICT: the same bits at any thread count for matrix products); ONEDNN: oneDNN's kernels.
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CUDA_PINS = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS (torch's documented setting)
KERNEL_LEVEL = "AVX2"  # what torch.backends.cpu.get_cpu_capability() must report under portable
PAD_MULTIPLE = 8  # tokens; the AVX2 vector holds 8 float32
RECORDED_ENV = (*CPU_PINS, *CUDA_PINS, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "LD_PRELOAD")
# MKL takes a CNR branch other than AUTO or COMPATIBLE only on a CPU its vendor check calls Intel's
# (Intel's MKL docs); on others MKL_CBWR=AVX2 falls back to AUTO without a word. Preloaded, this
# answers the check with yes, so MKL runs the same AVX2 code as on Intel. Only MKL calls it.
MKL_VENDOR_SHIM = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
MKL_BRANCHES = {1: "off", 2: "AUTO", 3: "COMPATIBLE", 10: "AVX2", 12: "AVX512"}  # mkl_cbwr_get(MKL_CBWR_BRANCH)
MKL_BRANCH = 10  # AVX2: what MKL must run under portable
RESTARTED = "TDABENCH_RESTARTED"  # set by restart_for_shim: a job restarts once, not in a loop

_active = "native"  # the mode of this process (set by pin_environment / active)


class NumericsError(StudyError, RuntimeError):
    """`numerics` cannot be honoured here; one line naming what is missing and the way out."""


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise NumericsError(f"config key numerics: {mode!r} is not one of {', '.join(MODES)}")


def cpu_model() -> str:
    """The CPU's model name (e.g. 'AMD EPYC 7B13'), or the machine type where it is not known."""
    info = _cpuinfo()
    found = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def cpu_vendor() -> str:
    found = re.search(r"^vendor_id\s*:\s*(\S+)", _cpuinfo(), re.M)
    return found.group(1) if found else platform.machine()


def cpu_flags() -> set[str]:
    found = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
    return set(found.group(1).split()) if found else set()


@functools.cache
def _cpuinfo() -> str:  # read once a process: the CPU does not change under it
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def check_host(mode: str, flags: set[str] | None = None, machine: str | None = None) -> None:
    """Refuse `portable` on a CPU that cannot run the pinned AVX2 kernels (one line, the way out)."""
    check_mode(mode)
    if mode != "portable":
        return
    machine = machine or platform.machine()
    flags = cpu_flags() if flags is None else flags
    if machine.lower() not in ("x86_64", "amd64") or "avx2" not in flags:
        what = f"a {machine} CPU" if machine.lower() not in ("x86_64", "amd64") else "a CPU without AVX2"
        raise NumericsError(
            f"numerics: portable pins the AVX2 kernels of torch, MKL and oneDNN, and this machine has {what} "
            f"({cpu_model()}); run with numerics: native (e.g. --config numerics=native), whose numbers may "
            "differ from other machines'"
        )


def pin_environment(mode: str, environ=None, vendor: str | None = None) -> dict[str, str]:
    """Export the pins of `mode` (call before torch is imported; a job's environment passes them on
    to the libraries as they load) and make `mode` this process's. Returns what was set. On a CPU
    not Intel's, portable also puts MKL's vendor shim on LD_PRELOAD, which takes hold in processes
    started after this (`restart_needed` says whether this one must start again)."""
    global _active
    check_host(mode)
    environ = os.environ if environ is None else environ
    pins = {**CPU_PINS, **CUDA_PINS} if mode == "portable" else {}
    if mode == "portable" and needs_vendor_shim(vendor):
        pins["LD_PRELOAD"] = _with_shim(environ.get("LD_PRELOAD", ""))
    environ.update(pins)
    _active = mode
    return pins


def _with_shim(ld_preload: str) -> str:
    """LD_PRELOAD with MKL's vendor shim first and what it held after."""
    shim = str(mkl_vendor_shim())
    return ":".join([shim, *(p for p in re.split(r"[:\s]+", ld_preload) if p and p != shim)])


def needs_vendor_shim(vendor: str | None = None) -> bool:
    """True on a CPU whose vendor MKL does not call Intel's: there MKL honours its AVX2 pin only
    with the vendor shim preloaded."""
    return (vendor or cpu_vendor()) != "GenuineIntel"


def shim_loaded() -> bool:
    """Whether this process started with MKL's vendor shim preloaded."""
    import ctypes

    return hasattr(ctypes.CDLL(None), "mkl_serv_intel_cpu_true")  # only if preloaded: torch loads MKL locally


def restart_needed(environ=None) -> bool:
    """True where LD_PRELOAD names MKL's vendor shim but this process started without it (the
    dynamic loader reads LD_PRELOAD at start only)."""
    environ = os.environ if environ is None else environ
    return _shim_name() in environ.get("LD_PRELOAD", "") and not shim_loaded()


def restart_for_shim() -> None:
    """Execute this process again, once, where `restart_needed` (a job on a CPU not Intel's, after
    `pin_environment`); a process restarted and still without the shim is refused in one line."""
    import sys

    if not restart_needed():
        return
    if os.environ.get(RESTARTED):
        raise NumericsError(
            f"numerics: portable: the dynamic loader did not preload MKL's vendor shim (LD_PRELOAD="
            f"{os.environ['LD_PRELOAD']}; its message is above); run with numerics: native instead"
        )
    os.environ[RESTARTED] = "1"
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _shim_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tdabench"


def _shim_name() -> str:
    import hashlib

    return f"mkl-vendor-shim-{hashlib.sha256(MKL_VENDOR_SHIM.encode()).hexdigest()[:12]}.so"


def mkl_vendor_shim() -> Path:
    """The shim library, built from `MKL_VENDOR_SHIM` with the C compiler the first time (into
    ~/.cache/tdabench, written under a temporary name and renamed, so a half-built file is never
    loaded)."""
    import shutil
    import subprocess
    import sysconfig
    import tempfile

    directory = _shim_dir()
    target = directory / _shim_name()
    if target.exists():
        return target
    named = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"]  # CC as a user set it first
    compiler = next((found for name in named if name and (found := shutil.which(name.split()[0]))), None)
    if compiler is None:
        raise NumericsError(
            f"numerics: portable on this {cpu_vendor()} CPU preloads a one-line library so that MKL runs its AVX2 "
            "branch, and building it needs a C compiler (cc or gcc; none found); install one, or run with "
            "numerics: native (--config numerics=native), whose numbers may differ from other machines'"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        source, built = Path(tmp) / "shim.c", Path(tmp) / target.name
        source.write_text(MKL_VENDOR_SHIM)
        result = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise NumericsError(
                f"numerics: portable: building MKL's vendor shim with {compiler} failed "
                f"({result.stderr.strip()[:300]}); run with numerics: native (--config numerics=native) instead"
            )
        os.replace(built, target)
    return target


def mkl_branch() -> int | None:
    """The conditional-numerical-reproducibility branch MKL runs in this process (MKL_BRANCHES),
    or None where torch carries no MKL. Asks torch's own MKL, so call it after torch is imported."""
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):  # another build's layout: MKL not found where the wheel has it
        return None
    torch.ones(2, 2) @ torch.ones(2, 2)  # MKL reads MKL_CBWR on its first call
    return get(1) & 0xFF  # 1 = MKL_CBWR_BRANCH; the strict flag sits above the branch bits


def configure_torch(mode: str) -> None:
    """After torch is imported: check that the CPU pins took hold, and pin CUDA's algorithms."""
    import torch

    if mode != "portable":
        return
    level = torch.backends.cpu.get_cpu_capability()
    if level != KERNEL_LEVEL:
        raise NumericsError(
            f"numerics: portable needs torch's {KERNEL_LEVEL} kernels, but this process runs {level} ones: "
            f"torch was imported before tdabench.numerics.pin_environment (export "
            f"ATEN_CPU_CAPABILITY={CPU_PINS['ATEN_CPU_CAPABILITY']} before starting Python)"
        )
    branch = mkl_branch()
    if branch is not None and branch != MKL_BRANCH:
        name = MKL_BRANCHES.get(branch, str(branch))
        raise NumericsError(
            f"numerics: portable needs MKL's {MKL_BRANCHES[MKL_BRANCH]} branch, but MKL runs its {name} branch on this "
            f"{cpu_vendor()} CPU ({cpu_model()}): start the job after tdabench.numerics.pin_environment, which exports "
            f"MKL_CBWR={CPU_PINS['MKL_CBWR']} and, on a CPU not Intel's, preloads MKL's vendor shim (LD_PRELOAD; "
            "workflow/scripts/stage.py restarts a job for it), or run with numerics: native"
        )
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns, not fails
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def token_multiple() -> int:
    """Batches are padded to a multiple of this many tokens (1: no padding) in this process."""
    return PAD_MULTIPLE if _active == "portable" else 1


def mode() -> str:
    return _active


@contextmanager
def active(mode: str):
    """Run library code under `mode`'s padding (tests; jobs use pin_environment)."""
    global _active
    check_mode(mode)
    before, _active = _active, mode
    try:
        yield
    finally:
        _active = before


def environment(device=None) -> dict:
    """What this process computes with, for provenance: the CPU, the kernel level torch runs, the
    pins and thread variables in force, threads, library versions and the GPU (if one is used)."""
    import numpy
    import torch
    import transformers

    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", torch.__config__.show())
    gpu = None
    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        "numerics": _active,
        "cpu_model": cpu_model(),
        "cpu_vendor": cpu_vendor(),
        "cpu_avx512": "avx512f" in cpu_flags(),
        "kernel_level": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        "threads": torch.get_num_threads(),
        "token_multiple": token_multiple(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "mkl": mkl.group(1) if mkl else None,
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }


def preload(vendor: str | None = None) -> str:
    """LD_PRELOAD for a process that must compute as portable jobs do (`make test`): MKL's vendor
    shim first on a CPU not Intel's, then what LD_PRELOAD already held."""
    held = os.environ.get("LD_PRELOAD", "")
    return _with_shim(held) if needs_vendor_shim(vendor) and "avx2" in cpu_flags() else held


if __name__ == "__main__":  # python -m tdabench.numerics preload  (the Makefile's test targets)
    import sys

    if sys.argv[1:] != ["preload"]:
        sys.exit("usage: python -m tdabench.numerics preload")
    try:
        print(preload())
    except NumericsError as e:  # no compiler, say: one line and a non-zero exit, so `make test` stops
        sys.exit(str(e))
