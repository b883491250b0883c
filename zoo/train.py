"""Training loops of the zoo: next-token pretraining on the task mixture and answer-only SFT per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mergetune.zoo.presets import Schedule

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """A tokenized item: `<s> prompt answer </s>`; the first `prompt_len` ids are the prompt (with <s>)."""

    ids: tuple[int, ...]
    prompt_len: int


def encode_examples(tokenizer, records: list[dict[str, str]]) -> list[Example]:
    """Records `{"prompt", "answer"}` → examples, with the tokenizer's <s> and </s> around them."""
    examples = []
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]  # starts with <s>
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        examples.append(Example(tuple(prompt + answer + [tokenizer.eos_token_id]), len(prompt)))
    return examples


def collate(examples: list[Example], pad_id: int, answer_only: bool) -> dict[str, Tensor]:
    """Right-padded batch with labels; padding (and, with `answer_only`, the prompt) is left out of the loss."""
    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids)
        input_ids[row, :n] = torch.tensor(example.ids)
        attention[row, :n] = 1
        first_label = example.prompt_len if answer_only else 1
        labels[row, first_label:n] = input_ids[row, first_label:n]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def train(
    model: torch.nn.Module,
    examples: list[Example],
    schedule: Schedule,
    *,
    pad_id: int,
    answer_only: bool,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[torch.optim.AdamW, float]:
    """Train in place with AdamW on batches drawn (seeded) from `examples`; returns the optimizer and the last loss.

    Loss is mean cross-entropy over the labelled tokens: all of them for pretraining, the answer
    (and </s>) for SFT.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=schedule.betas, eps=schedule.eps, weight_decay=schedule.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    model.train()
    loss_value = float("nan")
    for step in range(schedule.steps):
        picks = torch.randint(len(examples), (schedule.batch_size,), generator=generator).tolist()
        batch = collate([examples[i] for i in picks], pad_id, answer_only)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(step, loss_value)
    model.eval()
    return optimizer, loss_value


def second_moments(model: torch.nn.Module, optimizer: torch.optim.AdamW) -> dict[str, Tensor]:
    """AdamW's `exp_avg_sq` per parameter, keyed exactly like `model.named_parameters()`."""
    return {name: optimizer.state[param]["exp_avg_sq"].detach().clone().contiguous() for name, param in model.named_parameters()}


def optimizer_metadata(optimizer: torch.optim.AdamW) -> dict[str, str]:
    """Step count, betas, lr and eps of a single-group AdamW, as safetensors metadata strings."""
    group = optimizer.param_groups[0]
    step = int(optimizer.state[group["params"][0]]["step"])
    beta1, beta2 = group["betas"]
    return {
        "step": str(step),
        "beta1": repr(float(beta1)),
        "beta2": repr(float(beta2)),
        "lr": repr(float(group["initial_lr"])),
        "eps": repr(float(group["eps"])),
        "weight_decay": repr(float(group["weight_decay"])),
    }
