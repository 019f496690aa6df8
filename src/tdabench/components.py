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


GROUPS = {
    "attn": {"q", "k", "v", "o", "qkv"},
    "mlp": {"gate", "up", "down", "gate_up", "fc_in", "fc_out"},
}


def _layer_range(spec: str, layers: list[int]) -> set[int]:
    """ "3" -> {3}; "1-3" -> {1, 2, 3}; "-1" -> {last layer}."""
    top = max(layers, default=-1)
    if re.fullmatch(r"-?\d+", spec):
        i = int(spec)
        return {top + 1 + i if i < 0 else i}
    match = re.fullmatch(r"(\d+)-(\d+)", spec)
    if not match:
        raise ValueError(f"bad layer range {spec!r} (use e.g. 3, 0-3 or -1 for the last layer)")
    return set(range(int(match.group(1)), int(match.group(2)) + 1))


def _matches(name: str, family: str, pattern: str) -> bool:
    if pattern in ("all", "*"):
        return True
    if pattern in GROUPS:
        return family in GROUPS[pattern]
    if pattern in KNOWN_FAMILIES:
        return family == pattern
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(short_name(name), pattern)


def match_components(
    names: list[str], patterns: list[str], families: list[str] | None = None, layers: list[int | None] | None = None
) -> list[str]:
    """Names selected by `patterns`, in the order of `names`.

    A pattern is a family ("q", "down", "embed", ...), a group ("attn", "mlp"), "all", or a glob
    matched against the full parameter name and its short form ("layers.*.mlp.down_proj"),
    optionally restricted to layers with "@": "mlp@-1" (last layer's MLP), "o@0-3", "*@2".
    `families` / `layers` override what the names imply (e.g. as stored in a similarity file).
    Raises ValueError naming a pattern that selects nothing.
    """
    families = [family_of(n) for n in names] if families is None else list(families)
    layer = dict(zip(names, [layer_of(n) for n in names] if layers is None else layers))
    present = [v for v in layer.values() if v is not None and v >= 0]
    chosen: set[str] = set()
    for pattern in patterns:
        base, _, spec = pattern.partition("@")
        hits = {n for n, f in zip(names, families) if _matches(n, f, base)}
        if spec:
            keep = _layer_range(spec, present)
            hits = {n for n in hits if layer[n] in keep}
        if not hits:
            raise ValueError(
                f"pattern {pattern!r} matches no component; use a family "
                f"({', '.join(KNOWN_FAMILIES)}), a group ({', '.join(GROUPS)}), 'all', or a glob over "
                f"names such as {short_name(names[0])!r}, optionally with @<layer>|@<a>-<b>"
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
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (h, h),
                p + "self_attn.v_proj.weight": (h, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab_size, h)
    return shapes
