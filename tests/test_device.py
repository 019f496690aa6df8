"""The device key, and batches that run out of memory: halved, retried, and still exact.

There is no GPU here, so out-of-memory is injected: a forward pre-hook on the model raises
torch.OutOfMemoryError (what CUDA raises) whenever a forward pass sees more samples than a limit.
"""

import logging

import pytest
import torch

from tdabench.device import DeviceError, halving, resolve_device
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.gradcheck import reference_gradients
from tdabench.models import TinyModelConfig, build_tiny_model, train_tokenizer
from tdabench.train import TrainConfig, greedy_answers, precision_context, train

from helpers import padded_batch, tiny_llama

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")


def memory_limit(model, max_rows):
    """Make `model` raise out-of-memory on forward passes over more than `max_rows` samples."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.shape[0])
        if ids.shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {ids.shape[0]} > {max_rows} rows)")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_auto_and_cpu_resolve_here_and_bad_values_name_the_key():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "", "CPU"):
        with pytest.raises(DeviceError, match="config key device"):
            resolve_device(bad)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_an_error_naming_the_device_never_a_cpu_fallback(spec):
    with pytest.raises(DeviceError, match=rf"device is '{spec}', but CUDA is not available.*device: cpu"):
        resolve_device(spec)


def test_a_small_batch_does_not_shrink_the_batches_after_it():
    """Only an out-of-memory split lowers the batch size: a unit of 2 queries (or a table's last,
    short batch) before a batch of 5 leaves the 5 in one pass."""
    model = tiny_llama()
    cfg = ExtractionConfig(components=("down",), batch_size=5, max_component_dim=None, sketch_seed=0, autocast=None)
    extraction = Extraction(model, cfg)
    seen = memory_limit(model, max_rows=5)
    for lengths in ([9, 5], [9, 5, 7, 8, 6]):
        ids, mask, labels = padded_batch(lengths, [2] * len(lengths))
        extraction({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert seen == [2, 5] and extraction.max_rows is None


def test_out_of_memory_halves_the_batch_keeps_the_size_and_stays_exact(caplog):
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5, 7, 8, 6], [3, 2, 4, 2, 3])
    cfg = ExtractionConfig(
        components=("down", "lm_head"), batch_size=5, max_component_dim=None, sketch_seed=0, autocast=None
    )
    extraction = Extraction(model, cfg)
    seen = memory_limit(model, max_rows=2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with caplog.at_level(logging.WARNING, logger="tdabench.device"):
        got = extraction(batch)
    assert extraction.max_rows == 2  # 5 failed, 2 worked: kept for the next batch
    assert [r for r in seen if r > 1][:3] == [5, 2, 2]  # (bs=1 passes are the loop's, none here)
    assert "out of memory on 5 samples; retrying with 2" in caplog.text
    ref, _ = reference_gradients(model, ids, mask, labels, extraction.names, range(5))
    for n in extraction.names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6)
    seen.clear()
    buffers = extraction.buffers(5)
    into = extraction(batch, out=buffers)  # the next batch starts at the size that worked: no failed attempt
    assert max(seen) == 2
    for n in extraction.names:  # each half went straight into its rows of the caller's buffers
        assert into[n].data_ptr() == buffers[n].data_ptr() and torch.equal(into[n], got[n])


def test_out_of_memory_on_one_sample_is_a_clear_error():
    model = tiny_llama()
    ids, mask, labels = padded_batch([9, 5], [3, 2])
    extraction = Extraction(model, ExtractionConfig(("lm_head",), 2, None, 0, None))
    memory_limit(model, max_rows=0)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory with a single sample.*tokenize.max_length"):
        extraction({"input_ids": ids, "attention_mask": mask, "labels": labels})


def test_generation_halves_on_out_of_memory_and_gives_the_same_answers():
    texts = [f"Where does person {i} live? In town {i}." for i in range(6)]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_tiny_model(TinyModelConfig(320, 16, 24, 2, 2), tok, seed=0)
    prompts = [f"Where does person {i} live?" for i in range(6)]
    want = greedy_answers(model, tok, prompts, 32, max_new_tokens=4, batch_size=3)
    memory_limit(model, max_rows=1)
    assert greedy_answers(model, tok, prompts, 32, max_new_tokens=4, batch_size=3) == want


def test_halving_returns_rows_in_order_and_the_size_that_worked():
    calls = []

    def run(rows):
        calls.append((rows.start, rows.stop))
        if rows.stop - rows.start > 3:
            raise torch.OutOfMemoryError("injected")
        return list(range(rows.start, rows.stop))

    parts, size = halving(run, 10, 8, "test")
    assert [x for p in parts for x in p] == list(range(10)) and size == 2
    assert calls[:3] == [(0, 8), (0, 4), (0, 2)]


def test_training_in_bfloat16_autocast_learns_and_refuses_unknown_precisions():
    texts = [f"Where does person {i} live? In town {i}." for i in range(8)]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_tiny_model(TinyModelConfig(320, 16, 24, 2, 2), tok, seed=0)
    from tdabench.models import TokenizeConfig, encode_all

    examples = encode_all(
        tok, [t.split("?")[0] + "?" for t in texts], [t.split("? ")[1] for t in texts], TokenizeConfig(32, "response")
    )
    cfg = TrainConfig(5, 4, 1e-2, 0.0, 0.0, 0.0, "bfloat16", 0)
    curve = train(model, examples, tok.pad_token_id, cfg, progress=False)
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    with pytest.raises(ValueError, match="float16"):
        precision_context(torch.device("cpu"), "float16")
