"""Tiny random models of every architecture we support, built offline from transformers' own config classes.

`tiny_config(arch)` is the real config class at toy sizes (hidden 32, two layers by default);
`build_models` saves a base and fine-tune-like experts (base + small deltas) as safetensors with
the character tokenizer, optionally with added tokens in some experts.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

ARCH_SIZES = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
GQA = {"num_key_value_heads": 2}
# name → (config class, extra fields). `tie_word_embeddings` as the published checkpoints of each family.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**GQA, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {**GQA, "tie_word_embeddings": True}),  # Qwen2.5-0.5B/1.5B tie
    "qwen3": ("Qwen3Config", {**GQA, "head_dim": 8, "tie_word_embeddings": True}),  # Qwen3-0.6B ties
    "mistral": ("MistralConfig", {**GQA, "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {**GQA, "head_dim": 8, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {**GQA, "head_dim": 8, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {**GQA, "tie_word_embeddings": False}),
    "gpt_neox": ("GPTNeoXConfig", {"tie_word_embeddings": False}),  # Pythia: untied `embed_out`
    "olmo2": ("Olmo2Config", {**GQA, "tie_word_embeddings": False}),
}
CAUSAL_LM = {"Gemma3TextConfig": "Gemma3ForCausalLM"}  # config classes whose causal LM is not the auto class's name


def tiny_config(arch: str, num_layers: int = 2, vocab_size: int | None = None, **overrides: Any):
    """The architecture's transformers config at toy sizes, with `architectures` set as a saved model has it."""
    import transformers

    class_name, extra = ARCHITECTURES[arch]
    # The character tokenizer's special ids (zoo/tokenizer.py): <pad> 0, <s> 1, </s> 2.
    fields = {**ARCH_SIZES, **extra, "num_hidden_layers": num_layers, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    config = getattr(transformers, class_name)(**fields)
    model_class = CAUSAL_LM.get(class_name) or transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__
    config.architectures = [model_class]
    return config


@functools.cache
def tiny_structure(arch: str = "llama", num_layers: int = 4):
    """The layer structure of `tiny_config(arch, num_layers)` (for search spaces without model files)."""
    from mergetune.merge.architecture import model_structure

    return model_structure(tiny_config(arch, num_layers))


def build_models(
    root: Path,
    arch: str,
    experts: tuple[str, ...] = ("a", "b", "c"),
    num_layers: int = 2,
    seed: int = 0,
    added_tokens: dict[str, list[str]] | None = None,
    **config_overrides: Any,
) -> dict[str, str]:
    """base + experts saved as safetensors with the character tokenizer; an expert in `added_tokens` gets those
    tokens added to its tokenizer and its embedding (and head) resized, as a chat fine-tune does."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergetune.zoo.tokenizer import build_char_tokenizer

    added_tokens = added_tokens or {}
    tokenizer = build_char_tokenizer()
    config = tiny_config(arch, num_layers, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    paths = {}
    for i, name in enumerate(("base", *experts)):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))  # a resize changes its model's config
        model.load_state_dict(base.state_dict())
        own = build_char_tokenizer()
        if name != "base":
            generator = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=generator))
            if name in added_tokens:
                own.add_tokens(added_tokens[name])
                model.resize_token_embeddings(len(own), mean_resizing=False)
                with torch.no_grad():  # new rows: random, as training would leave them
                    for t in {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight,
                              id(model.get_output_embeddings().weight): model.get_output_embeddings().weight}.values():
                        t[len(tokenizer):] = 0.02 * torch.randn(t[len(tokenizer):].shape, generator=generator)
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        own.save_pretrained(path)
        if arch == "gpt_neox":
            add_pythia_buffers(path / "model.safetensors", config)
        paths[name] = str(path)
    return paths


def add_pythia_buffers(path: Path, config) -> None:
    """The per-layer buffers Pythia's checkpoints on the hub carry (and mergekit's GPT-NeoX definition requires),
    which transformers 5 no longer saves and drops on load: the causal mask, its fill value, RoPE's inverse frequencies."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    positions = config.max_position_embeddings
    rotary = int(config.hidden_size // config.num_attention_heads * config.rope_parameters["partial_rotary_factor"])
    for i in range(config.num_hidden_layers):
        p = f"gpt_neox.layers.{i}.attention."
        tensors[p + "bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
        tensors[p + "masked_bias"] = torch.tensor(-1e9)
        tensors[p + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    save_file(tensors, path, metadata={"format": "pt"})
