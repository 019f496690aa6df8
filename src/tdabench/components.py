"""Component registry: one component = one parameter tensor of the model.

A component is named by its parameter name as `model.named_parameters()` gives it (tied tensors
appear once, under their first name). Families group components by function across layers
(`q`, `down`, `embed`, ...) so configs can select e.g. "every attention output projection".
No torch import here: the Snakefile uses this module at parse time to check configs.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass
from math import prod

# Ordered: the first matching rule names the family. Covers Llama/Mistral/Qwen2/SmolLM2, GPT-2
# (Conv1D), GPT-NeoX/Pythia (fused QKV) and OLMo/OLMo-2 parameter names.
FAMILY_RULES: list[tuple[str, str]] = [
    (r"(^|\.)(lm_head|embed_out)\.", "lm_head"),
    (r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.", "embed"),
    (r"(^|\.)wpe\.", "pos_embed"),
    (r"\.q_proj\.", "q"),
    (r"\.k_proj\.", "k"),
    (r"\.v_proj\.", "v"),
    (r"\.(query_key_value|c_attn|att_proj|qkv_proj|Wqkv)\.", "qkv"),
    (r"\.(o_proj|out_proj|attn_out)\.|\.attn\.c_proj\.|\.attention\.dense\.", "o"),
    (r"\.gate_up_proj\.", "gate_up"),
    (r"\.gate_proj\.", "gate"),
    (r"\.up_proj\.", "up"),
    (r"\.down_proj\.", "down"),
    (r"\.mlp\.c_fc\.|\.dense_h_to_4h\.|\.fc1\.|\.ff_proj\.", "fc_in"),
    (r"\.mlp\.c_proj\.|\.dense_4h_to_h\.|\.fc2\.|\.ff_out\.", "fc_out"),
    (r"norm|(^|\.)ln_", "norm"),
]
KNOWN_FAMILIES = sorted({family for _, family in FAMILY_RULES} | {"other"})
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Component:
    name: str  # parameter name, e.g. "model.layers.3.mlp.down_proj.weight"
    family: str  # e.g. "down"
    layer: int | None  # decoder layer index, None for embeddings / final norm / head
    shape: tuple[int, ...]
    kind: str  # "weight" or "bias"

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def short(self) -> str:
        """Readable name: "layers.3.mlp.down_proj" for "model.layers.3.mlp.down_proj.weight"."""
        return short_name(self.name)


def short_name(name: str) -> str:
    name = re.sub(r"^(model|transformer|gpt_neox)\.", "", name)
    return re.sub(r"\.weight$", "", name)


def family_of(name: str) -> str:
    for pattern, family in FAMILY_RULES:
        if re.search(pattern, name):
            return family
    return "other"


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def describe(name: str, shape: tuple[int, ...]) -> Component:
    kind = "bias" if name.endswith(".bias") else "weight"
    return Component(name, family_of(name), layer_of(name), tuple(shape), kind)


def component_registry(model) -> list[Component]:
    """Every trainable parameter tensor of `model`, in model order, tied tensors once."""
    comps = [describe(n, tuple(p.shape)) for n, p in model.named_parameters()]
    unknown = [c.name for c in comps if c.family == "other"]
    if unknown and len(unknown) == len(comps):
        warnings.warn(
            f"unknown architecture {type(model).__name__}: no parameter matched a known family; "
            "every parameter tensor is its own component (family 'other')",
            stacklevel=2,
        )
    return comps


def match_components(names: list[str], patterns: list[str]) -> list[str]:
    """Names selected by `patterns`, in the order of `names`.

    A pattern is a family name ("q", "down", "embed", ...), or a glob matched against the full
    parameter name and against its short form ("layers.*.mlp.down_proj").
    Raises ValueError naming a pattern that selects nothing.
    """
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in KNOWN_FAMILIES:
            hits = {n for n in names if family_of(n) == pattern}
        else:
            hits = {
                n for n in names
                if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(short_name(n), pattern)
            }
        if not hits:
            raise ValueError(
                f"pattern {pattern!r} matches no component; use a family "
                f"({', '.join(KNOWN_FAMILIES)}) or a glob over names such as {short_name(names[0])!r}"
            )
        chosen |= hits
    return [n for n in names if n in chosen]


def tiny_llama_shapes(
    vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the default tiny LlamaForCausalLM, in `named_parameters()` order.

    Lets config checks (k <= gradient dimension) run without building the model; a test checks it
    against the real model.
    """
    h, f = hidden_size, intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab_size, h)
    return shapes
