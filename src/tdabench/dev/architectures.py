"""Every causal-LM architecture transformers knows, built tiny and checked: are our per-sample
gradients exact (vs the bs=1 `loss.backward()` loop), or refused by the self-check — never wrong?

`tiny_configs(model_type)` shrinks the architecture's default config (width, depth, heads, experts,
vocabulary, windows, low-rank and state sizes, ...) with one generic rule set, offline.
`check_architecture(model_type)` builds it, extracts the per-sample gradient of every component of
a padded batch with response-only labels, and compares every sample with the reference loop.
`python -m tdabench.dev.bench architectures` runs all of them and writes docs/architectures.md.
"""

from __future__ import annotations

import copy
import math
import os
import time
import traceback
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 96
WIDTH, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, EXPERTS = 32, 4, 2, 8, 48, 2, 4
TOLERANCE = 1e-4

# Config keys (as the config classes spell them) -> tiny value. Values are upper bounds except
# the vocabulary, which is set (token ids of the test batch are drawn below it).
SIZES: dict[str, int] = {}
for _keys, _value in {
    (
        "hidden_size",
        "n_embd",
        "d_model",
        "dim",
        "embed_dim",
        "hidden_dim",
        "model_dim",
        "word_embed_proj_dim",
        "embedding_size",
        "emb_size",
        "d_embed",
        "emb_dim",
        "mamba_d_ssm",
    ): WIDTH,
    ("hidden_size_per_layer_input", "token_budget"): 16,
    ("compress_ratio",): 4,
    (
        "intermediate_size",
        "n_inner",
        "ffn_dim",
        "d_ff",
        "ffn_hidden_size",
        "decoder_ffn_dim",
        "encoder_ffn_dim",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "intermediate_size_mlp",
        "expert_intermediate_size",
        "dense_intermediate_size",
        "d_inner",
        "block_ff_dim",
        "ff_dim",
        "moe_shared_expert_intermediate_size",
        "intermediate_size_moe",
        "mlp_hidden_size",
        "expert_ffn_hidden_size",
    ): FFN,
    ("zero_expert_num",): 2,
    ("n_shared_experts", "n_input_layers", "n_recurrent_layers", "n_output_layers"): 1,
    (
        "num_hidden_layers",
        "n_layer",
        "num_layers",
        "n_layers",
        "decoder_layers",
        "encoder_layers",
        "num_decoder_layers",
        "num_blocks",
    ): LAYERS,
    (
        "num_attention_heads",
        "n_head",
        "num_heads",
        "n_heads",
        "decoder_attention_heads",
        "encoder_attention_heads",
        "attention_heads",
        "num_attention_heads_per_layer",
    ): HEADS,
    (
        "num_key_value_heads",
        "n_kv_heads",
        "num_kv_heads",
        "multi_query_group_num",
        "n_head_kv",
        "num_key_value_groups_per_layer",
    ): KV_HEADS,
    (
        "head_dim",
        "kv_channels",
        "attention_head_size",
        "d_kv",
        "d_head",
        "v_head_dim",
        "head_size",
        "mamba_headdim",
    ): HEAD_DIM,
    ("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "rotary_emb_dim", "rope_dim"): HEAD_DIM // 2,
    ("kv_lora_rank", "q_lora_rank", "o_lora_rank", "lora_rank", "time_step_rank", "conv_dim", "num_memory_tokens"): 16,
    (
        "num_experts",
        "n_routed_experts",
        "num_local_experts",
        "moe_num_experts",
        "n_experts",
        "num_experts_routed",
    ): EXPERTS,
    (
        "num_experts_per_tok",
        "moe_topk",
        "top_k",
        "num_selected_experts",
        "moe_k",
        "num_experts_per_token",
        "n_group",
        "topk_group",
    ): 2,
    ("vocab_size", "n_vocab", "vocab_size_per_layer_input"): VOCAB,
    (
        "max_position_embeddings",
        "n_positions",
        "n_ctx",
        "max_seq_len",
        "seq_length",
        "max_sequence_length",
        "context_length",
        "max_target_positions",
        "max_source_positions",
        "sliding_window",
        "window_size",
        "attention_window",
        "local_attention_window",
        "chunk_size",
        "attention_chunk_size",
    ): 64,
    (
        "state_size",
        "ssm_state_size",
        "mamba_d_state",
        "d_state",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "mamba_head_dim",
        "mamba_d_head",
    ): 8,
    ("linear_num_key_heads", "linear_num_value_heads", "mamba_n_groups", "n_groups", "num_groups"): 2,
    ("mamba_n_heads", "n_mamba_heads"): 4,
    ("conv_kernel", "mamba_d_conv", "d_conv", "linear_conv_kernel_dim", "conv_L_cache"): 4,
    ("num_buckets", "relative_attention_num_buckets"): 8,
}.items():
    SIZES.update(dict.fromkeys(_keys, _value))
SET_EXACTLY = {"vocab_size", "n_vocab", "vocab_size_per_layer_input"}
TOKEN_KEYS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "unk_token_id",
)
# Keys set to a value (not shrunk): dense first layer then MoE, no layer sharing, one-group routing.
FIXED = {
    "first_k_dense_replace": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_kv_shared_layers": 0,
    "expand": 1,
    "mamba_expand": 1,
    "axial_pos_shape": [8, 8],
    "axial_pos_embds_dim": [16, 16],
    "num_codebooks": 1,
    "attn_layer_indices": [1],
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "hybrid_layer_ids": [1],
}
NONE_MEANS_OFF = {
    "sliding_window",
    "attention_window",
    "q_lora_rank",
    "attention_chunk_size",
    "window_size",
    "local_attention_window",
    "o_lora_rank",
}
# Architectures that need one call after building (the model refuses to run otherwise).
SETUP = {"xmod": [lambda m: m.set_default_language(m.config.languages[0])]}
MAX_PARAMS = 20_000_000  # a tiny model that is still bigger than this is listed as not built


def _is_config(value) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _tiny_kwargs(cfg, depth: int = 0) -> dict:
    """Constructor arguments that make `cfg` tiny: every size key it has, shrunk; sub-configs rebuilt."""
    kwargs = {}
    for key, value in vars(cfg).items():
        if _is_config(value) and depth < 3:
            kwargs[key] = _rebuild(value, depth + 1)
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            kwargs[key] = SIZES[key] if key in SET_EXACTLY else min(value, SIZES[key])
        elif key in SIZES and value is None and key not in NONE_MEANS_OFF:
            kwargs[key] = SIZES[key]  # left for a checkpoint to fill in
        elif key in TOKEN_KEYS and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = VOCAB - 1 - TOKEN_KEYS.index(key)
        elif key in FIXED:
            kwargs[key] = FIXED[key]
    for key in ("layer_types", "layers_block_type", "block_types", "hybrid_layer_types"):
        kinds = getattr(cfg, key, None)
        if isinstance(getattr(type(cfg), key, None), property):
            continue  # derived from other keys
        if isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
            keep = list(dict.fromkeys(kinds))  # hybrid models: one layer of each kind, in order
            keep = keep + keep[:1] if len(keep) == 1 else keep
            kwargs[key] = keep
            for layers_key in ("num_hidden_layers", "n_layer", "num_layers"):
                if layers_key in kwargs:
                    kwargs[layers_key] = len(keep)
    if getattr(cfg, "is_decoder", None) is False:
        kwargs["is_decoder"] = True  # encoder classes in the causal-LM mapping: as a decoder
    if "qk_rope_head_dim" in kwargs:  # multi-head latent attention: keys per head, rope part sized by head_dim
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
        if "num_key_value_heads" in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    return kwargs


def _rebuild(cfg, depth: int = 0, sub_as_dict: bool = False):
    """A tiny config of `cfg`'s class, built by its own constructor so derived sizes follow."""
    kwargs = _tiny_kwargs(cfg, depth)
    if sub_as_dict:
        kwargs = {k: {**getattr(cfg, k).to_dict(), **v.to_dict()} if _is_config(v) else v for k, v in kwargs.items()}
    try:
        return type(cfg)(**kwargs)
    except Exception:  # some constructors reject a key they also store: set what they accept
        cfg = copy.deepcopy(cfg)
        for key, value in kwargs.items():
            try:
                setattr(cfg, key, value)
            except Exception:
                pass
        return cfg


def tiny_configs(model_type: str) -> list:
    """Candidate tiny configs of the architecture `model_type` (a key of the causal-LM mapping), in
    order of preference: sub-configs rebuilt as objects, then passed as dicts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_class = causal_lm_class(model_type)
    out = []
    for sub_as_dict in (False, True):
        cfg = _rebuild(CONFIG_MAPPING[model_type](), sub_as_dict=sub_as_dict)
        if not isinstance(cfg, model_class.config_class):  # e.g. musicgen: the LM takes the decoder's config
            cfg = next((v for v in vars(cfg).values() if isinstance(v, model_class.config_class)), cfg)
        out.append(cfg)
    return out


def causal_lm_class(model_type: str):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def build_tiny(model_type: str, seed: int = 0):
    """The tiny model of `model_type` (first candidate config that builds and runs a forward pass)."""
    import torch

    model_class, first_error = causal_lm_class(model_type), None
    ids = torch.arange(1, 6)[None]
    for cfg in tiny_configs(model_type):
        try:
            torch.manual_seed(seed)
            model = model_class._from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
            for setup in SETUP.get(model_type, ()):
                setup(model)
            with torch.no_grad():
                model(input_ids=ids)
            return model
        except Exception as e:  # noqa: BLE001 - try the next candidate, report the first failure
            first_error = first_error or e
    raise first_error


def probe_batch(config, lengths=(9, 5, 12, 7), prompt_lengths=(3, 2, 6, 1), seed: int = 1):
    """Right-padded batch with response-only labels (prompt tokens and padding are -100), padded
    with the model's pad token; tokens are drawn from ids that are no special token of the config."""
    import torch

    text = config.get_text_config(decoder=True)  # composite (multimodal) configs: the language model's
    special = {
        v
        for c in (config, text)
        for k, v in vars(c).items()
        if k.endswith(("_token_id", "_index")) and isinstance(v, int)
    }
    allowed = torch.tensor([i for i in range(1, text.vocab_size) if i not in special])
    pad = text.pad_token_id if isinstance(getattr(text, "pad_token_id", None), int) else 0
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, mask, labels


@dataclass
class ArchitectureResult:
    model_type: str
    model_class: str
    status: str  # exact | refused | wrong | not built | error
    reason: str = ""
    n_params: int = 0
    n_components: int = 0
    worst_error: float = math.nan
    paths: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> {family: count}
    seconds: float = 0.0

    @property
    def built(self) -> bool:
        return self.status != "not built"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def check_architecture(model_type: str) -> ArchitectureResult:

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tdabench.components import component_registry
    from tdabench.gradcheck import GradientCheckError, check_extractor, reference_gradients, relative_errors
    from tdabench.gradients import GradientExtractor

    start = time.perf_counter()
    result = ArchitectureResult(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "not built")
    try:
        model = build_tiny(model_type)
        result.n_params = sum(p.numel() for p in model.parameters())
        if result.n_params > MAX_PARAMS:
            raise ValueError(f"still {result.n_params / 1e6:.0f}M parameters after shrinking")
        ids, mask, labels = probe_batch(model.config)
        names = [c.name for c in component_registry(model)]
        ref, _ = reference_gradients(model, ids, mask, labels, names, range(ids.shape[0]))
    except BaseException as e:  # noqa: BLE001 - any failure to build or run is "not built", with its reason
        if isinstance(e, KeyboardInterrupt):
            raise
        result.reason = _first_line(e)
        result.seconds = time.perf_counter() - start
        return result
    result.n_components = len(names)
    families = {c.name: c.family for c in component_registry(model)}
    try:
        extractor = GradientExtractor(model)
        grads, _ = check_extractor(extractor, ids, mask, labels, samples=2, tolerance=TOLERANCE)
        errors = relative_errors(grads, ref)
        result.worst_error = max(errors.values())
        bad = {n: e for n, e in errors.items() if not e <= TOLERANCE}
        if bad:
            result.status = "wrong"
            worst = max(bad, key=lambda n: bad[n] if bad[n] == bad[n] else math.inf)
            result.reason = f"{len(bad)} components wrong, worst {worst} ({bad[worst]:.2e})"
        else:
            result.status = "exact"
        for n, p in extractor.paths.items():
            fam = result.paths.setdefault(p.path, {})
            fam[families[n]] = fam.get(families[n], 0) + 1
    except GradientCheckError as e:
        lines = str(e).splitlines()
        result.status = "refused"
        result.reason = (
            "self-check: the model's batched loss differs from its bs=1 loss (it depends on padding "
            "or on the batch); exact with gradients.batch_size 1"
            if "already differs" in lines[-1]
            else lines[0]
        )
    except Exception as e:  # noqa: BLE001 - an extractor crash is a bug to list, not a refusal
        result.status, result.reason = (
            "error",
            _first_line(e) + " | " + traceback.format_exc(limit=-1).splitlines()[-3].strip(),
        )
    result.seconds = time.perf_counter() - start
    return result


def render_markdown(results: list[ArchitectureResult], header: str) -> str:
    from collections import Counter

    counts = Counter(r.status for r in results)
    built = sum(r.built for r in results)
    lines = [
        "# Architectures: per-sample gradients vs the bs=1 loop",
        "",
        "Generated by `python -m tdabench.dev.bench architectures` (do not edit by hand).",
        header,
        "",
        f"Every entry of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` ({len(results)}), built tiny by "
        "`tdabench.dev.architectures.tiny_configs` (random weights, fp32, eager attention) and checked on a "
        "right-padded batch of 4 samples with response-only labels: every component's per-sample gradient "
        f"against a bs=1 `loss.backward()` loop, relative error ≤ {TOLERANCE:g} (see `tdabench.gradcheck`).",
        "",
        f"**Built: {built} of {len(results)} ({built / max(len(results), 1):.0%}).** "
        + ", ".join(f"{s}: {counts.get(s, 0)}" for s in ("exact", "refused", "wrong", "error", "not built")),
        "",
        "Paths (see `tdabench.gradients`): **hook** — stock Linear/Embedding/Conv1D, batched input × output "
        "gradient; **vmap** — any other leaf module, torch.func over its own forward; **loop** — one "
        "backward per sample. Cells list component families and counts per path.",
        "",
        "| architecture | class | status | params | components | worst error | hook | vmap | loop | reason |",
        "|---|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for r in results:
        cells = []
        for path in ("hook", "vmap", "loop"):
            fam = r.paths.get(path, {})
            cells.append(", ".join(f"{f} {c}" for f, c in sorted(fam.items())) or "—")
        err = f"{r.worst_error:.1e}" if r.worst_error == r.worst_error else "—"
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.model_type} | {r.model_class} | {r.status} | {r.n_params:,} | {r.n_components} | "
            f"{err} | {' | '.join(cells)} | {reason} |"
        )
    return "\n".join(lines) + "\n"
