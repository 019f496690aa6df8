"""Models and text formatting: the tiny default model, its locally trained tokenizer, loading
saved checkpoints, and turning (prompt, response) pairs into token ids with loss labels.

Chat format: the tokenizer's chat template when it has one; otherwise the documented default
    "<|user|>\n{prompt}\n<|assistant|>\n" + "{response}<|eos|>"
Loss labels: -100 (ignored) on the prompt part, token ids on the response part and its EOS
(`loss_on="response"`, default) or on every token (`loss_on="all"`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tdabench import numerics
from tdabench.errors import ModelError
from tdabench.sections import TinyModelConfig, TokenizeConfig

USER, ASSISTANT, EOS, PAD = "<|user|>", "<|assistant|>", "<|eos|>", "<|pad|>"
DEFAULT_PREFIX = USER + "\n{prompt}\n" + ASSISTANT + "\n"
IGNORE_INDEX = -100


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts` (deterministic for the same texts), as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def build_tiny_model(cfg: TinyModelConfig, tokenizer, seed: int, max_positions: int = 256):
    """A freshly initialised Llama-architecture causal LM (untied head, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > model.tiny.vocab_size={cfg.vocab_size}")
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32).eval()


def load_model(path: str | Path, gguf_file: str | None = None):
    """Load a causal LM and its tokenizer: a saved directory, a hub name (needs HF_HUB_OFFLINE=0
    the first time), or a GGUF file in a directory (dequantised to float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    what = f"{str(path)!r}{' (' + gguf_file + ')' if gguf_file else ''}"
    local = Path(path).exists()
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        hint = (
            ""
            if local
            else (
                " It is not a local directory, and the Hugging Face hub is not reachable or "
                "HF_HUB_OFFLINE=1: download it first or set HF_HUB_OFFLINE=0."
            )
        )
        raise ModelError(f"cannot load the model {what}: {str(e).rstrip('.')}.{hint}") from None
    check_causal(config, path)  # as saved: causal-LM classes rewrite it
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model {what} has no usable tokenizer ({str(e).splitlines()[0][:200]}); save one beside the "
            f"weights (tokenizer.save_pretrained({str(path)!r}))"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs)
    except Exception as e:  # noqa: BLE001  (safetensors, torch and OS errors alike: the weights cannot be read)
        if isinstance(e, ModelError):
            raise
        raise ModelError(
            f"cannot read the weights of model {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
            "a weights file is corrupt, truncated or missing; save or download the model again"
        ) from None
    if gguf_file:
        model = _without_quantizer(model)
    if tokenizer.pad_token_id is None:  # batching needs one; never a labelled position (labels are -100 there)
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


class NotCausalError(ModelError):
    """The model does not predict each token from the ones before it."""


def check_causal(config, path) -> None:
    """Refuse encoder-decoders and bidirectional encoders that transformers would also load as a
    causal LM (BERT, RoBERTa, ... with is_decoder=False): their loss is not a next-token loss."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise NotCausalError(f"model {str(path)!r} ({kind}) is an encoder-decoder; tdabench attributes causal LMs")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise NotCausalError(
            f"model {str(path)!r} ({kind}) is a bidirectional encoder (is_decoder=False): every token sees the "
            "ones after it, so its next-token loss and gradients are not those of a causal LM; use a "
            "decoder-only model (or set is_decoder: true in its config.json if it was trained as one)"
        )


def _without_quantizer(model):
    """A GGUF model is loaded dequantised, but keeps a GGUF quantizer that refuses to save and
    train; rebuild it as a plain float32 model with the same weights."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    return plain.eval()


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the checkpoint's weight files: identifies the exact model a cache came from
    (for a hub name that is not a local directory: of the name)."""
    digest = hashlib.sha256()
    if not Path(path).is_dir():
        return "hub:" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    files = sorted(Path(path).glob("*.safetensors")) or sorted(Path(path).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {path}")
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def render(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """Split a formatted example into (prefix the model is given, response part it must produce)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prefix):
            raise ValueError("chat template: the rendered conversation does not start with the prompt part")
        return prefix, full[len(prefix) :]
    return DEFAULT_PREFIX.format(prompt=prompt), response + tokenizer.eos_token


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_prefix: int  # tokens of the prompt part (after truncation)
    truncated: bool


def encode_all(tokenizer, prompts, responses, cfg: TokenizeConfig) -> list[Encoded]:
    """Encode prompt/response pairs; truncations are counted (`Encoded.truncated`) and logged by callers."""
    return [encode(tokenizer, a, b, cfg.max_length, cfg.loss_on) for a, b in zip(prompts, responses)]


def unlabelled(examples: list[Encoded]) -> list[int]:
    """Indices of examples with no labelled token left to predict (after truncation): their loss
    and gradient would be zero, so no query could ever retrieve them."""
    return [i for i, e in enumerate(examples) if all(label == IGNORE_INDEX for label in e.labels[1:])]


def encode(tokenizer, prompt: str, response: str, max_length: int | None, loss_on: str = "response") -> Encoded:
    """One formatted example, cut to `max_length` tokens (None: whole)."""
    prefix, suffix = render(tokenizer, prompt, response)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    ids = prefix_ids + suffix_ids
    if loss_on == "response":
        labels = [IGNORE_INDEX] * len(prefix_ids) + suffix_ids
    elif loss_on == "all":
        labels = list(ids)
    else:
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    limit = len(ids) if max_length is None else max_length
    return Encoded(ids[:limit], labels[:limit], min(len(prefix_ids), limit), len(ids) > limit)


def encode_prompt(tokenizer, prompt: str, max_length: int | None) -> list[int]:
    prefix, _ = render(tokenizer, prompt, "")
    return tokenizer(prefix, add_special_tokens=False)["input_ids"][:max_length]


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each [batch, width]: the longest
    example's length, rounded up to the active numerics mode's token multiple (tdabench.numerics)."""
    multiple = numerics.token_multiple()
    width = -(-max(len(e.input_ids) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
