"""Seeded random projections of gradients, streamed one component at a time.

The full gradient is the concatenation of the components [g_1 | g_2 | ...]. A projection P (k x D)
splits into column blocks P = [P_1 | P_2 | ...], so P g = sum_c P_c g_c: each block is generated
from (seed, component index, chunk) alone, never as a whole k x D matrix, and the result equals
one fixed matrix applied to the concatenated vector. Kinds (all with E[<Px, Py>] = <x, y>):
  gaussian    P_ij ~ N(0, 1/k), generated in chunks of `CHUNK` input coordinates;
  rademacher  P_ij = +-1/sqrt(k);
  sjlt        sparse JL / count sketch: each input coordinate goes to `nonzeros` random output
              coordinates with random signs, scaled by 1/sqrt(nonzeros).
Block-wise projection (`blockwise`) instead projects each component on its own to k_c dims
(k_c proportional to its size, or equal) and concatenates the results. Normalised, each block is
scaled by 1/sqrt(k_c), so inner products stay unbiased; unnormalised (`normalized=False`, entries
N(0, 1) as in the published comparison) block c's inner product is inflated by k_c, which
re-weights components by their share of the dimensions: by parameter count when proportional.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

CHUNK = 8192  # columns of a Gaussian block generated at once (fixed: results never depend on memory)
FUSED_COLUMNS = 256  # Gaussian/Rademacher blocks narrower than this share one product per chunk
MAX_DRAW_THREADS = 4  # chunks drawn at once, at most (each holds a [CHUNK, k] buffer); same result for any


@dataclass(frozen=True)
class ProjectionConfig:
    kind: str  # gaussian | rademacher | sjlt
    k: int
    seed: int
    nonzeros: int  # sjlt only (projection.nonzeros)
    blockwise: str | None = None  # None: one projection of the concatenation; "proportional" | "equal" | "paper"
    normalized: bool = True  # False: the published unnormalised variant


# Projection methods of the study (config `projection.methods`), at every k and seed.
METHODS: dict[str, dict] = {
    "sjlt": {"kind": "sjlt"},
    "gaussian": {"kind": "gaussian"},
    "rademacher": {"kind": "rademacher"},
    "blockwise": {"kind": "gaussian", "blockwise": "proportional"},
    "blockwise_equal": {"kind": "gaussian", "blockwise": "equal"},
    "blockwise_unnormalized": {"kind": "gaussian", "blockwise": "proportional", "normalized": False},
    # The paper's: per-component Rademacher, k_c = max(512, 512 round(P_c / M k / 512)), unnormalised;
    # and the same normalised (unbiased inner products) beside it.
    "paper": {"kind": "rademacher", "blockwise": "paper", "normalized": False},
    "paper_normalized": {"kind": "rademacher", "blockwise": "paper"},
}
PAPER_BLOCK = 512  # the paper's per-component sizes are multiples of this, at least one


def method_config(method: str, k: int, seed: int, nonzeros: int = 1) -> ProjectionConfig:
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r} (allowed: {', '.join(METHODS)})")
    return ProjectionConfig(k=k, seed=seed, nonzeros=nonzeros, **METHODS[method])


def block_dims(dims: list[int], k: int, split: str) -> list[int]:
    """Output dims per component for block-wise projection (each at least 1). "paper": the paper's
    max(512, 512 round(P_c / M k / 512)) for components of P_c parameters out of M (Python's
    round, half to even); the sum is then near k, not k."""
    if split == "paper":
        total = sum(dims)
        return [max(PAPER_BLOCK, PAPER_BLOCK * round(d / total * k / PAPER_BLOCK)) for d in dims]
    if split == "proportional":
        total = sum(dims)
        return [max(1, round(k * d / total)) for d in dims]
    if split == "equal":
        return [max(1, k // len(dims) + (1 if i < k % len(dims) else 0)) for i in range(len(dims))]
    raise ValueError(f"unknown block split {split!r} (allowed: proportional, equal, paper)")


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
        self._moved: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None  # copies on a GPU

    def add(
        self, out: torch.Tensor, offset: int, block: torch.Tensor, scale: float = 1.0, overwrite: bool = False
    ) -> None:
        """out [n, k] += S restricted to input coordinates [offset, offset + block.shape[1]).
        overwrite: `block` is scratch, signed in place (no block-sized temporary)."""
        stop = offset + block.shape[1]
        rows, signs = self._hash_on(block.device)
        signs = signs[offset:stop].to(block.dtype) * scale
        signed = block.mul_(signs) if overwrite else block * signs
        # int64 indices: index_add_ is ~15x slower with int32 ones (kept int32 only to halve memory)
        out.index_add_(1, rows[offset:stop].long(), signed)

    def _hash_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The hash arrays on `device` (copied there once, for sketches computed on a GPU)."""
        if device == self.rows.device:
            return self.rows, self.signs
        if self._moved is None or self._moved[0] != device:
            self._moved = (device, self.rows.to(device), self.signs.to(device))
        return self._moved[1], self._moved[2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32, device=x.device)
        self.add(out, 0, x.to(torch.float32))
        return out


@dataclass(frozen=True)
class Block:
    """One projection's block of one component: `cfg`'s projection of rows [n, d_c] to `k` dims,
    its random numbers keyed by `index` (see `Projector.block`)."""

    cfg: ProjectionConfig
    index: int
    k: int


def _scale(cfg: ProjectionConfig, k: int) -> float:
    if cfg.kind == "sjlt":
        return cfg.nonzeros**-0.5 if cfg.normalized else 1.0
    return k**-0.5 if cfg.normalized else 1.0


def _draw(block: Block, j: int, out: torch.Tensor) -> torch.Tensor:
    """Chunk j of a Gaussian or Rademacher block: its [chunk, k] numbers, drawn into `out` from
    their own generator (seed, component index, chunk) and scaled in place."""
    gen = _generator(block.cfg.seed, block.index, j)
    if block.cfg.kind == "gaussian":
        out.normal_(generator=gen)
    else:
        torch.randint(0, 2, out.shape, generator=gen, out=out)
        out.mul_(2).sub_(1)
    return out.mul_(_scale(block.cfg, block.k))


def _check_kind(cfg: ProjectionConfig) -> None:
    if cfg.kind not in ("gaussian", "rademacher", "sjlt"):
        raise ValueError(f"unknown projection kind {cfg.kind!r} (allowed: gaussian, rademacher, sjlt)")


def project_component(
    x: torch.Tensor,
    component_index: int,
    cfg: ProjectionConfig,
    k: int | None = None,
) -> torch.Tensor:
    """P_c x for rows x [n, d_c] of component `component_index` -> [n, k] float32 (k = cfg.k unless
    given): one projection, the obvious way. `project_many` computes several at once, with the
    same numbers."""
    block = Block(cfg, component_index, cfg.k if k is None else k)
    _check_kind(cfg)
    x = x.to(torch.float32)
    n, d = x.shape
    out = torch.zeros(n, block.k, dtype=torch.float32)
    if cfg.kind in ("gaussian", "rademacher"):
        # Drawing the D x k numbers is most of the time, and one generator draws on one core. Each
        # chunk has a generator of its own, so chunks are drawn ahead in worker threads (torch lets
        # go of the GIL) while this thread adds them up in chunk order: the same numbers and the
        # same sums as drawing them one after another.
        starts = range(0, d, CHUNK)
        for b, start in zip(_drawn([(block, j) for j in range(len(starts))], d), starts):
            out += x[:, start : start + b.shape[0]] @ b
    else:  # sjlt: the sum of `nonzeros` independent count sketches
        for rep in range(cfg.nonzeros):
            CountSketch(d, block.k, cfg.seed, (component_index, rep)).add(out, 0, x, _scale(cfg, block.k))
    return out


def _drawn(draws: list[tuple[Block, int]], d: int) -> Iterator[torch.Tensor]:
    """The numbers of each (block, chunk) of `draws`, in that order, drawn up to MAX_DRAW_THREADS
    ahead in worker threads, each into a reused buffer (no new [chunk, k] memory per draw): a
    yielded block is valid until the next one is asked for."""
    if not draws:
        return
    ahead = min(len(draws), MAX_DRAW_THREADS, torch.get_num_threads())  # the job's thread budget
    widest = max(b.k for b, _ in draws)
    ring = [torch.empty(min(CHUNK, d) * widest) for _ in range(ahead)]

    def draw(t: int) -> torch.Tensor:
        block, j = draws[t]
        rows = min(CHUNK, d - j * CHUNK)
        return _draw(block, j, ring[t % ahead][: rows * block.k].view(rows, block.k))

    if ahead == 1:  # (no thread for a single draw, or a one-thread job)
        yield from map(draw, range(len(draws)))
        return
    with ThreadPoolExecutor(ahead) as pool:
        pending = [pool.submit(draw, t) for t in range(ahead)]
        for t in range(len(draws)):
            yield pending[t].result()
            if t + ahead < len(draws):  # draw t has been used: its buffer is free again
                pending.append(pool.submit(draw, t + ahead))


def project_many(
    x: torch.Tensor | Sequence[torch.Tensor], blocks: list[Block]
) -> tuple[list[torch.Tensor], list[float]]:
    """[project_component(x, b.index, b.cfg, b.k) for b in blocks] and the seconds spent on each,
    from two sweeps over the columns of x [n, d_c]: one for the Gaussian and Rademacher blocks'
    products, one for the count sketches (a pass per sketch repetition). x may also be row
    blocks [n_i, d_c] held apart (e.g. a pass' training examples and its queries): the outputs
    are then theirs stacked [sum n_i, k], every random block drawn once for all of them, and
    each row block multiplied on its own.

    Within a sweep each chunk of columns is read from memory once and used by every block while
    it is in cache, and scratch memory is chunk-sized. With more than one torch thread the two
    sweeps run at once, the sketches in a worker thread: the products are bound by arithmetic,
    the sketches by memory, and together they finish sooner than one after the other
    (docs/benchmarks.md). Each output is written by one sweep only, in the same order either
    way: the same bits. Gaussian and Rademacher blocks narrower than
    `FUSED_COLUMNS` (a block-wise projection's blocks: a few dozen columns at 135M parameters)
    share one product per chunk, their numbers drawn side by side by worker threads: skinny
    products run at a fraction of the machine's speed, and one generator draws on one core
    (docs/benchmarks.md). A shared block's numbers are its own draws, but its sums round as the
    wider product rounds them (float32; MKL takes another path for a few columns), so it equals
    `project_component`'s to float32 rounding; every other block, and every count sketch, bit
    for bit. Every block adds its chunks in column order, and a sketch repetition its chunks
    after the previous repetition's. A block's seconds are those of its own sweep (with both
    at once, they overlap)."""
    for b in blocks:
        _check_kind(b.cfg)
    parts = [p.to(torch.float32) for p in ([x] if isinstance(x, torch.Tensor) else x)]
    starts = np.cumsum([0] + [p.shape[0] for p in parts]).tolist()  # each row block's first output row
    outs: list[torch.Tensor] = [torch.empty(0)] * len(blocks)
    seconds = [0.0] * len(blocks)
    sketched = [i for i, b in enumerate(blocks) if b.cfg.kind == "sjlt"]
    products = _fused([(i, b.k) for i, b in enumerate(blocks) if b.cfg.kind != "sjlt"])
    if sketched and products and torch.get_num_threads() > 1:
        with ThreadPoolExecutor(1) as side:  # (products, and their MKL calls, stay in this thread)
            sketching = side.submit(_sketch_sweep, parts, starts, blocks, sketched, outs, seconds)
            _product_sweep(parts, starts, blocks, products, outs, seconds)
            sketching.result()
    else:
        _product_sweep(parts, starts, blocks, products, outs, seconds)
        _sketch_sweep(parts, starts, blocks, sketched, outs, seconds)
    return outs, seconds


def _product_sweep(
    parts: list[torch.Tensor],
    starts: list[int],
    blocks: list[Block],
    products: list[list[tuple[int, int]]],
    outs: list[torch.Tensor],
    seconds: list[float],
) -> None:
    """The Gaussian and Rademacher blocks of `products` (`_fused`) -> outs[i] [n, k], seconds[i]."""
    if not products:
        return
    d, n = parts[0].shape[1], starts[-1]
    rows = min(CHUNK, d)  # of a full chunk
    for product in products:
        for i, k in product:
            outs[i] = torch.zeros(n, k, dtype=torch.float32)
    widths = [sum(k for _, k in p) for p in products]
    numbers = torch.empty(rows * max(widths))  # a product's numbers, side by side
    drawn = torch.empty(rows * max([1] + [w for p, w in zip(products, widths) if len(p) > 1]))  # drawn whole
    workers = min(MAX_DRAW_THREADS, torch.get_num_threads())
    shares = [_shares(p, workers) for p in products]
    with ThreadPoolExecutor(workers) as pool:
        for j, start in enumerate(range(0, d, CHUNK)):
            width_j = min(CHUNK, d - start)  # columns of this chunk
            for product, width, share in zip(products, widths, shares):
                tick = time.perf_counter()
                fused = numbers[: width_j * width].view(-1, width)  # [chunk, width]
                if len(product) == 1:  # drawn in place: the product project_component makes
                    _draw(blocks[product[0][0]], j, fused)
                else:
                    members = [blocks[i] for i, _ in product]
                    list(pool.map(partial(_place, members, j, fused, drawn), share))
                for p, r0, r1 in zip(parts, starts, starts[1:]):
                    y = p[:, start : start + CHUNK] @ fused  # [n_i, width]
                    at = 0
                    for i, k in product:
                        outs[i][r0:r1] += y[:, at : at + k]
                        at += k
                spent = time.perf_counter() - tick
                for i, k in product:
                    seconds[i] += spent * k / width  # (a shared product's time, by width)


def _sketch_sweep(
    parts: list[torch.Tensor],
    starts: list[int],
    blocks: list[Block],
    sketched: list[int],
    outs: list[torch.Tensor],
    seconds: list[float],
) -> None:
    """The count sketches among `blocks` (positions `sketched`) -> outs[i] [n, k], seconds[i]."""
    if not sketched:
        return
    d, n = parts[0].shape[1], starts[-1]
    rows = min(CHUNK, d)  # of a full chunk
    # Count sketches sum into transposed outputs [k, n] from a transposed copy of each chunk
    # [chunk, n]: index_add_ along dim 0 adds contiguous rows of n, where along dim 1 it adds
    # strided columns (about 1.8x slower), and sketches with equal signs (the same seed and key, at
    # any k) sign a chunk once. Each output coordinate still adds the same terms one after another
    # in column order: the same sums, bit for bit.
    sketch_outs = {i: torch.zeros(blocks[i].k, n, dtype=torch.float32) for i in sketched}  # [k, n]
    columns = torch.empty(rows * n)  # a chunk, transposed [chunk, n]
    signed = torch.empty(rows * n)  # the chunk signed, for each group of sketches in turn
    for rep in range(max(blocks[i].cfg.nonzeros for i in sketched)):
        sketches = {
            i: CountSketch(d, blocks[i].k, blocks[i].cfg.seed, (blocks[i].index, rep))
            for i in sketched
            if blocks[i].cfg.nonzeros > rep
        }
        groups = _sign_groups(sketches, blocks)
        for start in range(0, d, CHUNK):
            width_j = min(CHUNK, d - start)  # columns of this chunk
            tick = time.perf_counter()
            chunk = columns[: width_j * n].view(width_j, n)
            for p, r0, r1 in zip(parts, starts, starts[1:]):
                chunk[:, r0:r1].copy_(p[:, start : start + width_j].T)
            transposing = (time.perf_counter() - tick) / len(sketches)
            for group in groups:
                tick = time.perf_counter()
                first = group[0]
                scale = _scale(blocks[first].cfg, blocks[first].k)
                signs = sketches[first].signs[start : start + width_j].to(torch.float32) * scale
                chunk_signed = torch.mul(chunk, signs[:, None], out=signed[: width_j * n].view(width_j, n))
                signing = (time.perf_counter() - tick) / len(group)
                for i in group:
                    tick = time.perf_counter()
                    # int64 indices: index_add_ is ~15x slower with int32 ones
                    sketch_outs[i].index_add_(0, sketches[i].rows[start : start + width_j].long(), chunk_signed)
                    seconds[i] += transposing + signing + time.perf_counter() - tick
    for i, out_t in sketch_outs.items():
        outs[i] = out_t.T.contiguous()  # [n, k]


def _sign_groups(sketches: dict[int, CountSketch], blocks: list[Block]) -> list[list[int]]:
    """The sketches in groups whose signed chunks are equal: the same signs and the same scale."""
    groups: list[list[int]] = []
    for i, sketch in sketches.items():
        for group in groups:
            first = group[0]
            same_scale = _scale(blocks[first].cfg, blocks[first].k) == _scale(blocks[i].cfg, blocks[i].k)
            if same_scale and torch.equal(sketches[first].signs, sketch.signs):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def _shares(product: list[tuple[int, int]], workers: int) -> list[list[tuple[int, int, int]]]:
    """A shared product's draws split between `workers` threads, balanced by width: per thread,
    (member, width, first column) triples."""
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    load = [0] * workers
    at = 0
    for member, (_, k) in enumerate(product):
        t = load.index(min(load))
        shares[t].append((member, k, at))
        load[t] += k
        at += k
    return [s for s in shares if s]


def _place(members: list[Block], j: int, fused: torch.Tensor, drawn: torch.Tensor, share) -> None:
    """Draw chunk j of the members in `share` whole and place each in its columns of `fused`
    [chunk, width] (a column slice would be drawn in another order). Run in a worker thread: each
    block has its own generator, so the numbers do not depend on which thread draws them."""
    rows = fused.shape[0]
    for member, k, at in share:
        fused[:, at : at + k] = _draw(members[member], j, drawn[rows * at : rows * (at + k)].view(rows, k))


def _fused(blocks: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """(block, width) pairs in products that each multiply a chunk once: narrow blocks side by
    side, in order, up to FUSED_COLUMNS wide together; a wider block on its own."""
    products: list[list[tuple[int, int]]] = []
    open_: list[tuple[int, int]] = []  # the narrow blocks' product being filled (in products too)
    for i, k in blocks:
        if k >= FUSED_COLUMNS:
            products.append([(i, k)])
            continue
        if not open_ or sum(w for _, w in open_) + k > FUSED_COLUMNS:
            open_ = []
            products.append(open_)
        open_.append((i, k))
    return products


class Projector:
    """Accumulates the projection of gradients that arrive one component (and row block) at a time."""

    def __init__(self, cfg: ProjectionConfig, component_dims: list[int]):
        self.cfg = cfg
        if cfg.blockwise is None:
            self.dims = None
            self.out_dim = cfg.k
        else:
            self.dims = block_dims(component_dims, cfg.k, cfg.blockwise)
            self.offsets = np.concatenate([[0], np.cumsum(self.dims)]).tolist()
            self.out_dim = int(self.offsets[-1])

    def block(self, component_index: int) -> Block:
        """What component `component_index` contributes: its block of the projection."""
        if self.dims is None:
            return Block(self.cfg, component_index, self.cfg.k)
        return Block(self.cfg, component_index, self.dims[component_index])

    def put(self, out: np.ndarray, component_index: int, y: torch.Tensor) -> None:
        """out [n, out_dim] += y [n, k], the component's projected rows, where they go."""
        if self.dims is None:
            out += y.numpy()
        else:
            out[:, self.offsets[component_index] : self.offsets[component_index + 1]] += y.numpy()

    def add(self, out: np.ndarray, component_index: int, x: torch.Tensor) -> None:
        """out [n, out_dim] += the contribution of component `component_index`'s rows x [n, d_c]."""
        b = self.block(component_index)
        self.put(out, component_index, project_component(x, b.index, self.cfg, k=b.k))


def project_store(
    store,
    cfg: ProjectionConfig,
    rows: np.ndarray | None = None,
    block_rows: int = 4096,
    components: list[str] | None = None,
) -> np.ndarray:
    """Project every sample (or `rows`) of a GradientStore -> [n, out_dim] float32.

    components: project only these (select-then-project); default: the full gradient. Component
    indices (which seed each block) are positions in the store, so a subset's blocks are the same
    as in the full projection.
    """
    names = store.components if components is None else components
    index = {n: i for i, n in enumerate(store.components)}
    proj = Projector(cfg, [store.dim(n) for n in names])
    n = len(store) if rows is None else len(rows)
    out = np.zeros((n, proj.out_dim), dtype=np.float32)
    for pos, name in enumerate(names):
        ci = index[name] if proj.dims is None else pos
        if rows is None:
            for start, block in store.iter_blocks(name, block_rows):
                proj.add(out[start : start + len(block)], ci, torch.from_numpy(block))
        else:
            proj.add(out, ci, torch.from_numpy(store.read(name, rows)))
    return out
