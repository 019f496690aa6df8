"""Small builders and slow references shared by tests."""

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tdabench.components import describe
from tdabench.store import GradientStoreWriter

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_store(path, ids, dims, seed=0, n_per_batch=3, attrs=None):
    """A gradient store with random rows; returns {component: [n, d] float32}."""
    rng = np.random.default_rng(seed)
    comps = [describe(f"model.layers.{i}.mlp.down_proj.weight", (d,)) for i, d in enumerate(dims)]
    data = {c.name: rng.standard_normal((len(ids), c.numel)).astype(np.float32) for c in comps}
    with GradientStoreWriter(path, ids, comps, "float32", {"model_fingerprint": "test", **(attrs or {})}) as w:
        for start in range(0, len(ids), n_per_batch):
            rows = slice(start, min(start + n_per_batch, len(ids)))
            w.write(rows, {n: v[rows] for n, v in data.items()})
    return data


def crash_writer(path, crash_after=None, attrs=None, keep_partial=False):
    """Write 18 rows in 6 batches; `os._exit(17)` after `crash_after` batches (a killed job).

    Returns how many batches it computed (skipping rows a partial file already has done).
    """
    import os
    from pathlib import Path

    ids = [f"s{i:02d}" for i in range(18)]
    comps = [describe("model.layers.0.mlp.up_proj.weight", (5, 4)), describe("lm_head.weight", (7,))]
    rng = np.random.default_rng(0)
    data = {c.name: rng.standard_normal((18, c.numel)).astype(np.float32) for c in comps}
    computed = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with GradientStoreWriter(path, ids, comps, attrs={"model_fingerprint": "x", **(attrs or {})}) as w:
            for b, start in enumerate(range(0, 18, 3)):
                if crash_after is not None and b == crash_after:
                    os._exit(17)
                rows = slice(start, start + 3)
                if w.done[rows].all():
                    continue
                w.write(rows, {n: v[rows] for n, v in data.items()})
                computed += 1
                if keep_partial and b == 2:
                    raise InterruptedError
    except InterruptedError:
        pass
    return computed


def similarity_from_gradients(qg, tg, gt, names=None, params=None, families=None, layers=None, candidates=None):
    """The similarity store of raw per-component gradients, built by hand: qg / tg are lists of
    [Q, d_c] / [T, d_c] arrays (one per component), gt the source index of each query; dense
    layout, or the candidate layout when `candidates` [Q, b] is given."""
    from tdabench.similarity import Similarity

    n_c = len(qg)
    dense = np.stack([q @ t.T for q, t in zip(qg, tg)])  # [C, Q, T]
    return Similarity(
        components=names or [f"c{c}" for c in range(n_c)],
        component_params=np.array(params if params is not None else [g.shape[1] for g in qg]),
        component_family=families or ["other"] * n_c,
        component_layer=np.array(layers if layers is not None else [-1] * n_c),
        query_ids=[f"q{i}" for i in range(len(qg[0]))],
        train_ids=[f"t{i}" for i in range(len(tg[0]))],
        ground_truth=np.asarray(gt),
        query_sqnorm=np.stack([(g * g).sum(1) for g in qg]),
        train_sqnorm=np.stack([(g * g).sum(1) for g in tg]),
        dot=dense if candidates is None else np.take_along_axis(dense, np.asarray(candidates)[None], axis=2),
        attrs={},
        candidates=None if candidates is None else np.asarray(candidates),
    )


def brute_force_ranks(qg, tg, gt, comps, queries, candidates=None):
    """The source's rank per query by an explicit loop: concatenate the chosen components' raw
    vectors, cosine against every training example (or the query's candidates), count the others
    scoring at least as high (ties against the source); inf when the source is not a candidate."""
    ranks = []
    for q in queries:
        qv = np.concatenate([qg[c][q] for c in comps])
        cols = range(len(tg[0])) if candidates is None else candidates[q]
        scores = {}
        for t in cols:
            tv = np.concatenate([tg[c][t] for c in comps])
            scores[int(t)] = qv @ tv / (np.linalg.norm(qv) * np.linalg.norm(tv))
        if int(gt[q]) not in scores:
            ranks.append(np.inf)
        else:
            ranks.append(1 + sum(1 for t, s in scores.items() if t != gt[q] and s >= scores[int(gt[q])]))
    return np.array(ranks, dtype=float)


# Tiny models and batches for gradient tests (token ids 1..VOCAB-1, 0 is padding).
VOCAB = 50


def tiny_llama(tie=False, hidden=16, intermediate=24):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def padded_batch(lengths, prompt_lengths, pad=0):
    """Right-padded batch with response-only labels (prompt tokens and padding are -100)."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, mask, labels


def config_leaves(node, path=()):
    """Dotted paths of a nested config's leaf keys (an empty mapping counts as a leaf)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from config_leaves(value, (*path, key))
    else:
        yield ".".join(path)


def papers_candidates(train_prompts, query_prompt, source: int, b: int = 5):
    """The paper's candidate code path, as a slow reference: rank_bm25.BM25Okapi over str.split()
    of the training prompts, np.argsort(-scores)[:b], the source overwriting the last slot when
    missing -> ({training row: score} of the b candidates, forced); None when the b-th and
    (b+1)-th best scores tie (there numpy's unstable sort decides which is in, so the paper's set is
    not defined; the order of tied scores within the set is not either, hence a mapping)."""
    import rank_bm25

    scores = rank_bm25.BM25Okapi([p.split() for p in train_prompts]).get_scores(query_prompt.split())
    ordered = np.sort(scores)[::-1]
    if len(ordered) > b and ordered[b - 1] == ordered[b]:
        return None
    top = np.argsort(-scores)[:b].tolist()
    forced = source not in top
    if forced:
        top[-1] = source
    return {t: scores[t] for t in top}, forced


def assert_papers_set(got, paper, train_ids):
    """One query's rows of the candidate table (sorted by slot) hold the paper's candidates with the
    package's scores, best first (ties: the lower training row), the source forced in alike."""
    expected, forced = paper
    rows = [train_ids.index(t) for t in got["train_id"].to_list()]
    assert dict(zip(rows, got["score"].to_list())) == expected
    assert got["forced"].to_list() == [False] * (len(rows) - 1) + [forced]
    ranked = rows[:-1] if forced else rows
    assert ranked == sorted(ranked, key=lambda t: (-expected[t], t))
