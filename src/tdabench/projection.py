"""Seeded random projections of the full gradient, streamed one component at a time.

The full gradient is the concatenation of the components [g_1 | g_2 | ...]. A projection P (k x D)
splits into column blocks P = [P_1 | P_2 | ...], so P g = sum_c P_c g_c: each block is generated
from (seed, component index, chunk) alone, never as a whole k x D matrix, and the result equals
one fixed matrix applied to the concatenated vector. Both kinds preserve inner products in
expectation (E[<Px, Py>] = <x, y>):
  gaussian  P_ij ~ N(0, 1/k), generated in chunks of `CHUNK` columns;
  sjlt      sparse JL / count sketch: each input coordinate goes to `nonzeros` random output
            coordinates with random signs, scaled by 1/sqrt(nonzeros).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 8192  # columns of a Gaussian block generated at once (fixed: results never depend on memory)


@dataclass(frozen=True)
class ProjectionConfig:
    kind: str = "sjlt"
    k: int = 1024
    seed: int = 0
    nonzeros: int = 1


def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def name_key(name: str) -> int:
    """Stable integer key of a component name (independent of component order and process)."""
    return zlib.crc32(name.encode())


class CountSketch:
    """Seeded count sketch R^d -> R^k: coordinate i is added to output h[i] with sign s[i].

    E[<Sx, Sy>] = <x, y> (unbiased inner products). The hash is kept as arrays so that any slice of
    the input can be added on its own (`add`), e.g. a per-sample gradient computed in row blocks.
    """

    def __init__(self, d: int, k: int, seed: int, key: int | tuple[int, ...]):
        gen = _generator(seed, *(key if isinstance(key, tuple) else (key,)))
        self.d, self.k = d, k
        self.rows = torch.randint(0, k, (d,), generator=gen, dtype=torch.int32)  # [d] output coordinate
        self.signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.int8) * 2 - 1  # [d] +-1

    def add(self, out: torch.Tensor, offset: int, block: torch.Tensor, scale: float = 1.0) -> None:
        """out [n, k] += S restricted to input coordinates [offset, offset + block.shape[1])."""
        stop = offset + block.shape[1]
        signs = self.signs[offset:stop].to(block.dtype) * scale
        # int64 indices: index_add_ is ~15x slower with int32 ones (kept int32 only to halve memory)
        out.index_add_(1, self.rows[offset:stop].long(), block * signs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32)
        self.add(out, 0, x.to(torch.float32))
        return out


def project_component(x: torch.Tensor, component_index: int, cfg: ProjectionConfig) -> torch.Tensor:
    """P_c x for a block of rows x [n, d_c] of component `component_index` -> [n, k] float32."""
    x = x.to(torch.float32)
    n, d = x.shape
    out = torch.zeros(n, cfg.k, dtype=torch.float32)
    if cfg.kind == "gaussian":
        for j, start in enumerate(range(0, d, CHUNK)):
            stop = min(start + CHUNK, d)
            gen = _generator(cfg.seed, component_index, j)
            block = torch.randn(stop - start, cfg.k, generator=gen) / cfg.k**0.5  # [chunk, k]
            out += x[:, start:stop] @ block
    elif cfg.kind == "sjlt":  # sum of `nonzeros` independent count sketches, scaled to stay unbiased
        for rep in range(cfg.nonzeros):
            CountSketch(d, cfg.k, cfg.seed, (component_index, rep)).add(out, 0, x, cfg.nonzeros**-0.5)
    else:
        raise ValueError(f"unknown projection kind {cfg.kind!r} (allowed: gaussian, sjlt)")
    return out


def project_store(store, cfg: ProjectionConfig, rows: np.ndarray | None = None, block_rows: int = 4096) -> np.ndarray:
    """Project every sample (or `rows`) of a GradientStore's full gradient -> [n, k] float32."""
    n = len(store) if rows is None else len(rows)
    out = np.zeros((n, cfg.k), dtype=np.float32)
    for ci, name in enumerate(store.components):
        if rows is None:
            for start, block in store.iter_blocks(name, block_rows):
                out[start:start + len(block)] += project_component(torch.from_numpy(block), ci, cfg).numpy()
        else:
            out += project_component(torch.from_numpy(store.read(name, rows)), ci, cfg).numpy()
    return out
