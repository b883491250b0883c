"""Batched greedy generation and answer scoring on a live causal LM (shared by the zoo and QuickEvaluator)."""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor


def normalize_answer(text: str) -> str:
    """What exact match compares: the generation up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to their answer after `normalize_answer`, in [0, 1]."""
    if not answers:
        return 0.0
    return sum(exact_matches(predictions, answers)) / len(answers)


def exact_matches(predictions: list[str], answers: list[str]) -> list[float]:
    """Per item: 1.0 where the prediction equals its answer after `normalize_answer`, else 0.0."""
    return [float(normalize_answer(p) == normalize_answer(a)) for p, a in zip(predictions, answers, strict=True)]


class NonFiniteLogits(ValueError):
    """The model produced NaN/inf logits (a broken merge); evaluators turn it into a failed trial."""


def _check_finite(logits: Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits("the model produced NaN or inf logits")


def cache_argument(model: torch.nn.Module) -> str:
    """The KV cache's name in the model's forward and output: `cache` from transformers 5.2x (where
    `past_key_values` is deprecated, to be removed), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches, KV cache), decoded without special tokens.

    Generation of a row stops at EOS or a newline; the text after it is dropped.
    """
    device = next(model.parameters()).device
    cache_arg = cache_argument(model)
    stop_ids = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["\n"])} - {None, tokenizer.unk_token_id}
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        input_ids, attention = batch["input_ids"], batch["attention_mask"]
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        past = None
        rows = input_ids.shape[0]
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        generated: list[Tensor] = []
        step_ids = input_ids
        for _ in range(max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=position_ids,
                use_cache=True,
                **{cache_arg: past},
            )
            logits = out.logits[:, -1, :]
            _check_finite(logits)
            next_ids = logits.argmax(-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, tokenizer.pad_token_id), next_ids)
            generated.append(next_ids)
            finished |= torch.isin(next_ids, torch.tensor(sorted(stop_ids), device=device))
            if finished.all():
                break
            past = out[cache_arg]
            step_ids = next_ids[:, None]
            attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype, device=device)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(rows)]
        for row in tokens:
            kept = []
            for token in row:
                if token in stop_ids or token == tokenizer.pad_token_id:
                    break
                kept.append(token)
            outputs.append(tokenizer.decode(kept, skip_special_tokens=True))
    return outputs


@torch.inference_mode()
def answer_logprobs(model: torch.nn.Module, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 64) -> list[float]:
    """Per item: the answer's mean log-likelihood per answer token, given the prompt (teacher forcing)."""
    device = next(model.parameters()).device
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        batch_answers = answers[start : start + batch_size]
        prompt_lens = [len(tokenizer(p)["input_ids"]) for p in batch_prompts]
        encoded = tokenizer([p + a for p, a in zip(batch_prompts, batch_answers)], return_tensors="pt", padding=True).to(device)
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits.float()
        _check_finite(logits)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        lengths = attention.sum(-1).tolist()
        width = ids.shape[1]
        for row, (length, prompt_len) in enumerate(zip(lengths, prompt_lens)):
            pad = width - length  # left padding
            answer_positions = slice(pad + prompt_len - 1, width - 1)
            span = logprobs[row, answer_positions]
            values.append(float(span.mean()) if span.numel() else 0.0)
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLogits("non-finite answer log-likelihood")
    return values
