"""One component's per-sample gradients for a batch of samples, held one of two ways behind one
interface, so the code that takes dot products never asks which.

* `Dense` — the gradients formed (or count-sketched): one row per sample, [n, dim].
* `Factors` — a linear layer's inputs and output gradients per token, the gradient never formed
  (tdabench.factored: grad[s] = g[s]ᵀ x[s]).

Which way a component takes is decided once per job by the cost rule (`tdabench.factored.choose`);
past that, `self_dots`, `gram`, `aligned` and `unit_dots` give float64 dot products either way. A
third way (a projection, say) is one more subclass of `Representation`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tdabench.factored import cross_dots, pair_dots


class Representation(ABC):
    """n samples' gradients of one component."""

    @property
    @abstractmethod
    def rows(self) -> int:
        """Samples held (n)."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Representation: ...

    def host(self) -> Representation:
        return self.to("cpu")

    @abstractmethod
    def double(self) -> Representation:
        """The same numbers in float64 (converted once, reused for many products)."""

    @abstractmethod
    def ready(self) -> Representation:
        """The same numbers held as its products read them best, for a batch that takes part in
        several products (its norms and its pairs): factors in float64, converted once; formed
        gradients as they are (their products convert them block by block)."""

    @abstractmethod
    def take(self, rows: torch.Tensor) -> Representation:
        """Samples `rows` ([k] indices) -> k samples."""

    @abstractmethod
    def self_dots(self) -> torch.Tensor:
        """Squared norm of each sample's gradient -> [n] float64."""

    @abstractmethod
    def gram(self, other: Representation) -> torch.Tensor:
        """Every pair's dot product with `other` (held the same way) -> [n, m] float64."""

    def gram_and_norms(
        self, other: Representation, own: bool, theirs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(self.gram(other), self.self_dots() if own, other.self_dots() if theirs) -> [n, m],
        [n], [m] float64 (None where not asked for): a held chunk against a training piece, with
        the norms a pass still needs, in one sweep where that reads each once."""
        return (
            self.gram(other),
            self.self_dots() if own else None,
            other.self_dots() if theirs else None,
        )

    @abstractmethod
    def aligned(self, ia: torch.Tensor, other: Representation, ib: torch.Tensor) -> torch.Tensor:
        """⟨self[ia[p]], other[ib[p]]⟩ for every p -> [P] float64."""

    def aligned_and_norms(
        self, ia: torch.Tensor, other: Representation, ib: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self.aligned(ia, other, ib), other.self_dots()) -> [P], [m] float64: a training batch's
        pairs with a unit's queries and its norms, in one sweep over it where that reads it once."""
        return self.aligned(ia, other, ib), other.self_dots()

    @abstractmethod
    def unit_dots(self, ia: torch.Tensor, ib: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Squared norms [n] and the dot products of pairs (ia[p], ib[p]) [P] among these samples,
        float64 on the host."""

    @classmethod
    @abstractmethod
    def concat(cls, reps: Sequence[Representation]) -> Representation:
        """Batches of one component (all held this way) -> one, rows in order."""

    @abstractmethod
    def collector(self, rows: int) -> Collector:
        """Where to gather `rows` samples taken from batches held like this one."""


class Collector(ABC):
    """Samples from batch after batch gathered into one representation; a batch can be freed once
    its samples are added."""

    @abstractmethod
    def add(self, rep: Representation, rows: torch.Tensor, at: slice) -> None:
        """Samples `rows` of `rep` to positions `at` (consecutive) of the result."""

    @abstractmethod
    def result(self) -> Representation: ...


BLOCK = 16384  # columns of formed gradients converted to float64 at a time (stays in cache)


def _blocks(dim: int) -> list[slice]:
    return [slice(s, min(s + BLOCK, dim)) for s in range(0, dim, BLOCK)]


def _rows64(t: torch.Tensor, rows: torch.Tensor, blk: slice) -> torch.Tensor:
    """t[rows, blk] in float64 [len(rows), block]; rows: sorted distinct indices (all: no gather)."""
    return t[:, blk].double() if len(rows) == t.shape[0] else t[rows, blk].double()


@dataclass
class Dense(Representation):
    """Formed per-sample gradients (or their count sketches). Products run in float64 over blocks
    of `BLOCK` columns, each converted as it is read: a product of [n, dim] float32 rows converted
    whole would cost more memory traffic than the product itself."""

    tensor: torch.Tensor  # [n, dim]

    @property
    def rows(self) -> int:
        return self.tensor.shape[0]

    def to(self, device: torch.device | str) -> Dense:
        return Dense(self.tensor.to(device))

    def host(self) -> Dense:
        return Dense(self.tensor.cpu())

    def double(self) -> Dense:
        return Dense(self.tensor.double())

    def ready(self) -> Dense:
        return self

    def take(self, rows: torch.Tensor) -> Dense:
        return Dense(self.tensor[rows])

    def self_dots(self) -> torch.Tensor:
        t = self.tensor  # [n, dim]
        out = torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
        for b in _blocks(t.shape[1]):
            r = t[:, b].double()
            out += (r * r).sum(1)  # (a block-sized temporary: faster than einsum's reduction)
        return out

    def gram(self, other: Dense) -> torch.Tensor:
        a, b = self.tensor, other.tensor  # [n, dim], [m, dim]
        out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
        for blk in _blocks(a.shape[1]):
            out.addmm_(a[:, blk].double(), b[:, blk].double().T)
        return out  # [n, m]

    def gram_and_norms(
        self, other: Representation, own: bool, theirs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not isinstance(other, Dense):
            return super().gram_and_norms(other, own, theirs)
        # Each block converted once for the product and the norms: the sums gram and self_dots
        # make, in their order.
        a, b = self.tensor, other.tensor  # [n, dim], [m, dim]
        out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
        sq_a = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device) if own else None
        sq_b = torch.zeros(b.shape[0], dtype=torch.float64, device=b.device) if theirs else None
        for blk in _blocks(a.shape[1]):
            ra, rb = a[:, blk].double(), b[:, blk].double()  # [n, block], [m, block]
            if sq_a is not None:
                sq_a += (ra * ra).sum(1)
            if sq_b is not None:
                sq_b += (rb * rb).sum(1)
            out.addmm_(ra, rb.T)
        return out, sq_a, sq_b

    def aligned(self, ia: torch.Tensor, other: Dense, ib: torch.Tensor) -> torch.Tensor:
        return self._pairs(ia, other, ib, norms=False)[0]

    def aligned_and_norms(
        self, ia: torch.Tensor, other: Representation, ib: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(other, Dense):
            return super().aligned_and_norms(ia, other, ib)
        return self._pairs(ia, other, ib, norms=True)

    def _pairs(
        self, ia: torch.Tensor, other: Dense, ib: torch.Tensor, norms: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The Gram of the rows the pairs use, each converted once per block, then the pairs picked
        # from it: pairs repeat rows (a unit's queries against a training batch), and one small
        # matrix product costs less than gathering, multiplying and summing each pair's rows.
        # With norms, `other` is converted whole, block by block, once for both.
        a, b = self.tensor, other.tensor  # [n, dim], [m, dim]
        ua, pa = torch.unique(ia, return_inverse=True)  # [n'] rows used, [P] a pair's place among them
        ub, pb = torch.unique(ib, return_inverse=True)  # [m'], [P]
        out = torch.zeros(len(ua), len(ub), dtype=torch.float64, device=a.device)
        sq = torch.zeros(b.shape[0], dtype=torch.float64, device=b.device) if norms else None
        every = len(ub) == b.shape[0]
        for blk in _blocks(a.shape[1]):
            if norms:
                r = b[:, blk].double()  # [m, block]
                sq += (r * r).sum(1)  # as self_dots adds it
                r = r if every else r[ub]
            else:
                r = _rows64(b, ub, blk)
            out.addmm_(_rows64(a, ua, blk), r.T)
        return out[pa, pb], sq  # [P], [m]

    def unit_dots(self, ia: torch.Tensor, ib: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        g = self.gram(self)  # [n, n]: one matrix product, no [P, dim] copies
        return torch.diagonal(g).cpu().numpy(), g[ia, ib].cpu().numpy()

    @classmethod
    def concat(cls, reps: Sequence[Dense]) -> Dense:
        if len(reps) == 1:
            return reps[0]
        return Dense(torch.cat([r.tensor for r in reps]))

    def collector(self, rows: int) -> Collector:
        t = self.tensor
        return _Block(torch.empty(rows, t.shape[1], dtype=t.dtype, device=t.device))


@dataclass
class Factors(Representation):
    """A linear weight's per-sample gradient left unformed: grad[s] = g[s]ᵀ x[s] (Conv1D: x[s]ᵀ g[s]).
    Calls of the layer are concatenated along tokens (the gradient sums over calls)."""

    x: torch.Tensor  # [n, tokens, d_in] layer inputs
    g: torch.Tensor  # [n, tokens, d_out] gradients of its outputs (zero where no loss reaches)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Factors:
        return Factors(self.x.to(device), self.g.to(device))

    def host(self) -> Factors:
        return Factors(self.x.cpu(), self.g.cpu())

    def double(self) -> Factors:
        return Factors(self.x.double(), self.g.double())

    def ready(self) -> Factors:
        return self.double()

    def take(self, rows: torch.Tensor) -> Factors:
        return Factors(self.x[rows], self.g[rows])

    def self_dots(self) -> torch.Tensor:
        return pair_dots(self.x, self.g, self.x, self.g)

    def gram(self, other: Factors) -> torch.Tensor:
        return cross_dots(self.x, self.g, other.x, other.g)

    def aligned(self, ia: torch.Tensor, other: Factors, ib: torch.Tensor) -> torch.Tensor:
        return pair_dots(self.x[ia], self.g[ia], other.x[ib], other.g[ib])

    def unit_dots(self, ia: torch.Tensor, ib: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.self_dots().cpu().numpy(), self.aligned(ia, self, ib).cpu().numpy()  # only the pairs

    @classmethod
    def concat(cls, reps: Sequence[Factors]) -> Factors:
        """Zero-padded to the longest along tokens (a zero output gradient adds nothing)."""
        if len(reps) == 1:
            return reps[0]
        t = max(r.x.shape[1] for r in reps)

        def pad(z: torch.Tensor) -> torch.Tensor:  # [n, tokens, d] -> [n, t, d]
            return z if z.shape[1] == t else F.pad(z, (0, 0, 0, t - z.shape[1]))

        return Factors(torch.cat([pad(r.x) for r in reps]), torch.cat([pad(r.g) for r in reps]))

    def collector(self, rows: int) -> Collector:
        return _Pieces()


def concat(reps: Sequence[Representation]) -> Representation:
    """Batches of one component -> one (see `Representation.concat`)."""
    return type(reps[0]).concat(reps)


class _Block(Collector):
    """Dense samples copied into one preallocated [rows, dim] block: no second copy when joining."""

    def __init__(self, block: torch.Tensor):
        self.block = block  # [rows, dim]

    def add(self, rep: Dense, rows: torch.Tensor, at: slice) -> None:
        torch.index_select(rep.tensor, 0, rows, out=self.block[at])

    def result(self) -> Dense:
        return Dense(self.block)


class _Pieces(Collector):
    """Factored samples kept per batch, joined (padded along tokens) at the end."""

    def __init__(self):
        self.pieces: list[Factors] = []

    def add(self, rep: Factors, rows: torch.Tensor, at: slice) -> None:
        self.pieces.append(rep.take(rows))

    def result(self) -> Factors:
        return Factors.concat(self.pieces)
