"""Data-flow paths on the HF backend: modules shared by reference, identity == the model, a KV cache per slot."""

from __future__ import annotations

import pytest
import torch

from mergetune.core.errors import ConfigError
from mergetune.evaluators.dataflow_model import PathModel, decoder_layers
from mergetune.merge.dataflow import DataflowPath, DataflowSlot

LAYERS = 3


def tiny_llama(seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def path(*slots: tuple[str, int, float]) -> DataflowPath:
    return DataflowPath(slots=[DataflowSlot(source=s, layer=i, scale=c) for s, i, c in slots])


@pytest.fixture
def models():
    live, expert = tiny_llama(0), tiny_llama(1)
    return live, expert, PathModel(live, {"base": list(decoder_layers(live)), "math": list(decoder_layers(expert))})


def test_path_layers_share_the_sources_parameters(models):
    live, expert, paths = models
    paths.apply(path(("math", 2, 1.0), ("base", 0, 0.7), ("math", 2, 1.3)))
    storage = {p.data_ptr() for p in live.parameters()}
    expert_layer = {p.data_ptr() for p in decoder_layers(expert)[2].parameters()}
    base_layer0 = {p.data_ptr() for p in paths.own[0].parameters()}
    assert expert_layer | base_layer0 <= storage
    slot_ptrs = [[p.data_ptr() for p in layer.parameters()] for layer in decoder_layers(live)]
    assert slot_ptrs[0] == slot_ptrs[2] == [p.data_ptr() for p in decoder_layers(expert)[2].parameters()]
    assert live.config.num_hidden_layers == 3
    assert decoder_layers(expert)[2].self_attn.layer_idx == 2  # the source layer keeps its own index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_identity_path_is_the_model_exactly(dtype):
    live = tiny_llama(0, dtype)
    ids = torch.randint(0, 64, (2, 7))
    expected = live(input_ids=ids).logits
    paths = PathModel(live, {"base": list(decoder_layers(live))})
    paths.apply(DataflowPath.identity("base", LAYERS))
    assert torch.equal(live(input_ids=ids).logits, expected)
    paths.apply(path(("base", 0, 1.0), ("base", 2, 1.0)))
    assert not torch.allclose(live(input_ids=ids).logits, expected)
    paths.restore()
    assert torch.equal(live(input_ids=ids).logits, expected)


def test_a_repeated_layer_generates_the_same_with_and_without_the_cache(models):
    live, _, paths = models
    paths.apply(path(("base", 0, 1.0), ("math", 1, 0.8), ("math", 1, 1.2), ("base", 0, 1.0), ("base", 2, 1.0)))
    ids = torch.randint(1, 64, (2, 5))
    cached = live.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = live.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    # the project's own generation loop (DynamicCache keyed by layer_idx) agrees with a cache-free forward per step
    step = ids
    for _ in range(4):
        step = torch.cat([step, live(input_ids=step).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached[:, : step.shape[1]], step)


def test_a_layer_a_source_lacks_is_one_line(models):
    _, _, paths = models
    with pytest.raises(ConfigError, match="math has layers 0-2, not 5"):
        paths.apply(path(("math", 5, 1.0)))


def test_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="Llama-family decoders"):
        PathModel(gpt2, {})
