"""The two ways of holding per-sample gradients give the same dot products through one interface."""

import numpy as np
import torch

from tdabench.representation import Dense, Factors, concat


def factors(n, tokens, seed, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    x, gy = torch.randn(n, tokens, d_in, generator=g), torch.randn(n, tokens, d_out, generator=g)
    gy[:, -1:] = 0  # a padded token: no output gradient
    return Factors(x, gy)


def formed(f: Factors) -> Dense:
    f = f.double()  # formed without rounding, to compare with the factored form
    return Dense(torch.einsum("sto,sti->soi", f.g, f.x).reshape(f.rows, -1))  # [n, d_out * d_in]


def test_dense_and_factors_agree_on_every_product():
    a, b = factors(4, 6, 0), factors(3, 4, 1)
    da, db = formed(a), formed(b)
    ia, ib = torch.tensor([0, 2, 3, 3]), torch.tensor([1, 0, 2, 0])
    torch.testing.assert_close(a.self_dots(), da.self_dots())
    torch.testing.assert_close(a.gram(b), da.gram(db))
    torch.testing.assert_close(a.aligned(ia, b, ib), da.aligned(ia, db, ib))
    for got, want in zip(a.aligned_and_norms(ia, b, ib), da.aligned_and_norms(ia, db, ib)):
        torch.testing.assert_close(got, want)
    for got, want in zip(a.unit_dots(ia, ib), da.unit_dots(ia, ib)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert a.self_dots().dtype == da.gram(db).dtype == torch.float64
    assert a.double().x.dtype == da.double().tensor.dtype == torch.float64


def test_concat_take_and_collect_keep_rows_in_order():
    parts = [factors(2, 6, 0), factors(3, 4, 1)]  # different token lengths: padded with zeros
    joined = concat(parts)
    assert joined.rows == 5 and joined.x.shape[1] == 6
    dense = concat([formed(p) for p in parts])
    torch.testing.assert_close(joined.self_dots(), dense.self_dots())
    rows = torch.tensor([4, 1])
    torch.testing.assert_close(joined.take(rows).gram(joined), dense.take(rows).gram(dense))
    for reps in (parts, [formed(p) for p in parts]):  # batch by batch into positions [0, 3)
        box = reps[0].collector(3)
        box.add(reps[0], torch.tensor([1]), slice(0, 1))
        box.add(reps[1], torch.tensor([0, 2]), slice(1, 3))
        got = box.result()
        want = concat(reps).take(torch.tensor([1, 2, 4]))
        torch.testing.assert_close(got.self_dots(), want.self_dots())


def test_dense_products_over_many_blocks_are_the_float64_products():
    """Formed gradients wider than a block (converted to float64 block by block) give the float64
    products of their float32 values, as a whole-row conversion would, to float64 rounding."""
    from tdabench.representation import BLOCK

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 2 * BLOCK + 123, generator=g), torch.randn(3, 2 * BLOCK + 123, generator=g)
    a64, b64 = a.double().numpy(), b.double().numpy()
    ia, ib = torch.tensor([0, 4, 4, 2]), torch.tensor([1, 0, 2, 2])
    np.testing.assert_allclose(Dense(a).gram(Dense(b)).numpy(), a64 @ b64.T, rtol=1e-13)
    np.testing.assert_allclose(Dense(a).self_dots().numpy(), (a64 * a64).sum(1), rtol=1e-13)
    np.testing.assert_allclose(
        Dense(a).aligned(ia, Dense(b), ib).numpy(), (a64[ia.numpy()] * b64[ib.numpy()]).sum(1), rtol=1e-13
    )
    assert Dense(a).ready().tensor is a  # formed gradients stay float32 until a product reads them


def test_pairs_of_formed_gradients_are_picked_from_the_gram_of_the_rows_they_use():
    """Pairs that repeat rows (a unit's queries against a training batch) come from one Gram of
    the rows they use: bit for bit the Gram's entries where they use every row, and the float64
    products where they use some, with more pairs than rows on either side or fewer."""
    from tdabench.representation import BLOCK

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, BLOCK + 77, generator=g), torch.randn(6, BLOCK + 77, generator=g)
    a64, b64 = a.double().numpy(), b.double().numpy()
    every = ([0, 0, 3, 1, 3, 3, 2, 2], [5, 1, 1, 0, 2, 4, 5, 3])
    for ia, ib in (every, ([2, 1], [4, 0]), ([3, 3, 3], [0, 5, 0])):
        ia, ib = torch.tensor(ia), torch.tensor(ib)
        got = Dense(a).aligned(ia, Dense(b), ib)
        assert got.dtype == torch.float64 and got.shape == (len(ia),)
        np.testing.assert_allclose(got.numpy(), (a64[ia.numpy()] * b64[ib.numpy()]).sum(1), rtol=1e-13)
        pairs, norms = Dense(a).aligned_and_norms(ia, Dense(b), ib)  # the same sweep, with b's norms
        assert torch.equal(pairs, got) and torch.equal(norms, Dense(b).self_dots())
    ia, ib = (torch.tensor(v) for v in every)
    assert torch.equal(Dense(a).aligned(ia, Dense(b), ib), Dense(a).gram(Dense(b))[ia, ib])


def test_a_gram_with_the_norms_a_pass_needs_is_the_gram_and_the_norms():
    """One sweep for a held chunk's product with a training piece and the norms still needed:
    bit for bit the separate products (formed, over several blocks), the float64 products of the
    float32 values, and None for a norm not asked for; factors give the formed numbers."""
    from tdabench.representation import BLOCK

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 2 * BLOCK + 5, generator=g), torch.randn(4, 2 * BLOCK + 5, generator=g)
    a64, b64 = a.double().numpy(), b.double().numpy()
    gram, sq_a, sq_b = Dense(a).gram_and_norms(Dense(b), own=True, theirs=True)
    assert torch.equal(gram, Dense(a).gram(Dense(b)))
    assert torch.equal(sq_a, Dense(a).self_dots()) and torch.equal(sq_b, Dense(b).self_dots())
    scale = np.linalg.norm(a64, axis=1)[:, None] * np.linalg.norm(b64, axis=1)[None]  # (entries may cancel)
    assert (np.abs(gram.numpy() - a64 @ b64.T) <= 1e-14 * scale).all()
    np.testing.assert_allclose(sq_b.numpy(), (b64 * b64).sum(1), rtol=1e-13)
    for own, theirs in ((False, True), (True, False), (False, False)):
        got = Dense(a).gram_and_norms(Dense(b), own, theirs)
        assert torch.equal(got[0], gram)
        assert (got[1] is None) != own and (got[2] is None) != theirs
    fa, fb = factors(3, 6, 0), factors(2, 4, 1)
    for got, want in zip(fa.gram_and_norms(fb, True, True), formed(fa).gram_and_norms(formed(fb), True, True)):
        torch.testing.assert_close(got, want)
