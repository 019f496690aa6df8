"""Where model work runs: the config key `device` resolved in a job, bf16 support, device timing,
and halving a batch that runs out of memory.

`device: auto` means CUDA when the job's host has it, else the CPU. An explicit `cuda` / `cuda:N`
on a host without CUDA is an error at the job's start (never a silent CPU fallback): a result
labelled as a GPU run must come from one.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
from collections.abc import Callable
from typing import TypeVar

import torch

from tdabench.errors import StudyError

log = logging.getLogger(__name__)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
T = TypeVar("T")


class DeviceError(StudyError, RuntimeError):
    """The configured device cannot be used on this host; names the device and the fix."""


def resolve_device(spec: str) -> torch.device:
    """The torch device of config value `spec` on this host (see the module docstring)."""
    if not DEVICE_PATTERN.match(spec or ""):
        raise DeviceError(f"config key device: {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"config key device is {spec!r}, but CUDA is not available on this host "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}): run the job "
                "where a GPU is (a GPU node, resources gpu=1), install a CUDA build of torch, or set "
                "device: cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"config key device is {spec!r}, but this host has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def describe(device: torch.device) -> str:
    """'cpu' or e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)': logged by every model job."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def supports_bf16(device: torch.device) -> bool:
    """bf16 autocast is fast only where the hardware has it (CUDA compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timings on a GPU measure nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def halving(run: Callable[[slice], T], n: int, start_rows: int, what: str) -> tuple[list[T], int]:
    """Run `run` over rows [0, n) in chunks of at most `start_rows`; a chunk that runs out of memory
    is retried in halves (logged), down to one row, after which the error is raised with a clear
    message. Returns (results in row order, the chunk size that worked) so callers keep the smaller
    size for later batches instead of failing again."""
    rows, out, start = max(1, start_rows), [], 0
    while start < n:
        chunk = slice(start, min(start + rows, n))
        try:
            out.append(run(chunk))
        except torch.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rows == 1:
                raise torch.OutOfMemoryError(
                    f"{what}: out of memory with a single sample ({str(e).splitlines()[0][:200]}); lower "
                    "tokenize.max_length, set gradients.max_component_dim, select fewer gradients.components, "
                    "or use a device with more memory"
                ) from None
            rows = max(1, rows // 2)
            log.warning("%s: out of memory on %d samples; retrying with %d", what, chunk.stop - chunk.start, rows)
            continue
        start = chunk.stop
    return out, rows


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Large tensors freed
    between smaller live ones leave the pages counted in the process' memory, where a job that
    next holds gigabytes of gradients would stack them on top; a no-op where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
