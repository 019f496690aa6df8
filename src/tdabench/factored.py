"""Exact dot products between per-sample gradients of a linear layer, with or without forming them
(issue 12: the streamed similarity store computes these straight from the model).

For y = x Wᵀ (+ b), sample a's weight gradient is G_aᵀ X_a, with X_a the layer's inputs
[tokens, d_in] and G_a the gradients of its outputs [tokens, d_out] (zero on padding). For two
samples a and b:

    ⟨G_aᵀ X_a, G_bᵀ X_b⟩ = Σ_i Σ_j (Σ_t G_a[t,i] X_a[t,j]) (Σ_t' G_b[t',i] X_b[t',j])
                         = Σ_{t,t'} (X_a X_bᵀ)[t,t'] · (G_a G_bᵀ)[t,t']

The right side ("factored") costs T_a·T_b·(d_in + d_out) multiply-adds per pair and never holds a
d_out × d_in gradient. Forming the gradients first ("materialised") costs T·d_in·d_out per sample,
then d_in·d_out per pair. Which is cheaper depends on how many pairs each sample takes part in:
few (a query and its b candidates, plus its squared norm) favour the factored form on long layers;
many (every query against every training example) favour forming each gradient once. `choose`
picks the one with fewer multiply-adds. GPT-2's Conv1D stores W as [d_in, d_out]; the inner product
is the same.
"""

from __future__ import annotations

import torch

FACTORED, MATERIALISED = "factored", "materialised"


def cost(how: str, tokens: int, d_in: int, d_out: int, pairs_per_sample: float) -> float:
    """Multiply-adds per sample of computing its `pairs_per_sample` dot products `how`."""
    if how == FACTORED:
        return pairs_per_sample * tokens * tokens * (d_in + d_out)
    if how == MATERIALISED:
        return tokens * d_in * d_out + pairs_per_sample * d_in * d_out
    raise ValueError(f"how must be {FACTORED!r} or {MATERIALISED!r}, not {how!r}")


def choose(tokens: int, d_in: int, d_out: int, pairs_per_sample: float) -> str:
    """The cheaper way for a layer of d_in -> d_out on samples of `tokens` tokens (ties: materialised)."""
    args = (tokens, d_in, d_out, pairs_per_sample)
    return FACTORED if cost(FACTORED, *args) < cost(MATERIALISED, *args) else MATERIALISED


def pair_dots(
    xa: torch.Tensor,
    ga: torch.Tensor,
    xb: torch.Tensor,
    gb: torch.Tensor,
    how: str = FACTORED,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """⟨grad_a[p], grad_b[p]⟩ for every pair p -> [P] in `dtype`.

    xa: [P, Ta, d_in], ga: [P, Ta, d_out] (inputs and output gradients of side a of each pair);
    xb: [P, Tb, d_in], gb: [P, Tb, d_out]. For a squared norm pass the same sample on both sides.
    """
    if xa.shape[0] != xb.shape[0] or xa.shape[:2] != ga.shape[:2] or xb.shape[:2] != gb.shape[:2]:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(("xa", "ga", "xb", "gb"), (xa, ga, xb, gb)))
        raise ValueError(f"pairs do not line up: {shapes}")
    xa, ga, xb, gb = (t.to(dtype) for t in (xa, ga, xb, gb))
    if how == FACTORED:
        inputs = torch.bmm(xa, xb.transpose(1, 2))  # [P, Ta, Tb]
        outputs = torch.bmm(ga, gb.transpose(1, 2))  # [P, Ta, Tb]
        return (inputs * outputs).sum((1, 2))
    if how == MATERIALISED:
        wa = torch.bmm(ga.transpose(1, 2), xa)  # [P, d_out, d_in]
        wb = torch.bmm(gb.transpose(1, 2), xb)
        return (wa * wb).sum((1, 2))
    raise ValueError(f"how must be {FACTORED!r} or {MATERIALISED!r}, not {how!r}")


def cross_dots(
    xa: torch.Tensor, ga: torch.Tensor, xb: torch.Tensor, gb: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """⟨grad_a[i], grad_b[j]⟩ for every i, j in factored form -> [A, B] in `dtype`.

    xa: [A, Ta, d_in], ga: [A, Ta, d_out]; xb: [B, Tb, d_in], gb: [B, Tb, d_out]. Two matrix
    products over all tokens at once, [A·Ta, B·Tb] each.
    """
    (a, ta, _), (b, tb, _) = xa.shape, xb.shape
    inputs = xa.reshape(a * ta, -1).to(dtype) @ xb.reshape(b * tb, -1).to(dtype).T  # [A·Ta, B·Tb]
    outputs = ga.reshape(a * ta, -1).to(dtype) @ gb.reshape(b * tb, -1).to(dtype).T
    return (inputs * outputs).view(a, ta, b, tb).sum((1, 3))
