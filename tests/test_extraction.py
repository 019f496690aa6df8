"""The extraction recipe: patterns matched, big components sketched, subsets and batches, all
against the bs=1 loss.backward() loop (and its count sketch)."""

import pytest
import torch

from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.gradcheck import reference_gradients
from tdabench.models import Encoded
from tdabench.projection import CountSketch, name_key

from helpers import padded_batch, tiny_llama


def test_patterns_sketches_and_subsets_match_the_loop():
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5, 7], [3, 2, 4])
    cfg = ExtractionConfig(
        components=("down", "lm_head"), batch_size=2, max_component_dim=200, sketch_seed=3, autocast=None
    )
    extraction = Extraction(model, cfg)
    assert extraction.names == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ]
    shapes = {n: p.numel() for n, p in model.named_parameters()}
    assert extraction.stored_dims == [min(shapes[n], 200) for n in extraction.names]
    assert set(extraction.sketch_info) == {n for n in extraction.names if shapes[n] > 200}

    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got = extraction(batch)
    ref, _ = reference_gradients(model, ids, mask, labels, extraction.names, range(3))
    for n in extraction.names:
        want = ref[n]
        if n in extraction.sketch_info:  # the same seeded sketch applied to the exact gradient
            s = extraction.sketch_info[n]
            assert s["key"] == name_key(n) and s["seed"] == 3
            want = CountSketch(shapes[n], 200, 3, name_key(n))(want)
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-6)

    last = ["model.layers.1.mlp.down_proj.weight"]
    sub = extraction(batch, last)
    assert list(sub) == last and extraction.extractor(last) is extraction.extractor(last)  # built once
    torch.testing.assert_close(sub[last[0]], got[last[0]])
    with pytest.raises(ValueError, match="not among the extracted"):
        extraction.extractor(["model.layers.0.self_attn.q_proj.weight"])


def test_batches_follow_batch_size_and_keep_order():
    model = tiny_llama()
    extraction = Extraction(model, ExtractionConfig(("lm_head",), 2, None, 0, None))
    examples = [Encoded([1 + i] * (i + 2), [-100] + [1 + i] * (i + 1), 1, False) for i in range(5)]
    rows = [(r.start, r.stop, b["input_ids"].shape) for r, b in extraction.batches(examples, pad_id=0)]
    assert rows == [(0, 2, (2, 3)), (2, 4, (2, 5)), (4, 5, (1, 6))]
