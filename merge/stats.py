"""Calibration statistics for merge methods: diagonal Fisher (Fisher averaging) and input Gram matrices (RegMean).

Both read a calibration JSONL of `{"prompt", "answer"}` records (the zoo's task format), feed
`prompt + answer + </s>` through the model, and write a safetensors file keyed by tensor name:
- Fisher: the mean over examples of the squared gradient of the answer tokens' LM loss,
  per parameter (keyed like `model.named_parameters()`);
- Gram: G = XᵀX / #tokens of the inputs X of every `nn.Linear`, keyed by that layer's weight
  name (`...q_proj.weight`), shape in × in — the running mean RegMean uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError, OutputExistsError
from mergetune.core.fs import atomic_output_file
from mergetune.merge.modelset import Checkpoint

log = logging.getLogger(__name__)

IGNORE = -100


def read_calibration(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """The `{"prompt", "answer"}` records of a JSONL file (the first `limit` of them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration data {path} not found")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"calibration data {path} is not UTF-8 text; save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append({"prompt": str(record["prompt"]), "answer": str(record.get("answer", ""))})
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected a JSON object with a \"prompt\" (and \"answer\")") from None
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ConfigError(f"{path} has no records")
    return records


def encode(tokenizer, records: list[dict[str, str]]) -> list[tuple[list[int], int]]:
    """(ids of prompt + answer + eos, number of prompt ids) per record."""
    out = []
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out.append((prompt + answer + eos, len(prompt)))
    return out


def load_model(model_dir: str | Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def diagonal_fisher(model: torch.nn.Module, examples: list[tuple[list[int], int]]) -> dict[str, Tensor]:
    """Mean over examples of squared per-example gradients of the answer-token loss (one example per backward)."""
    device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for ids, prompt_len in examples:
        input_ids = torch.tensor([ids], device=device)
        labels = input_ids.clone()
        if prompt_len < len(ids):  # without answer tokens, the whole sequence is the signal
            labels[:, :prompt_len] = IGNORE
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=labels).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.float().square()
    model.zero_grad(set_to_none=True)
    return {name: s / len(examples) for name, s in sums.items()}


@torch.no_grad()
def gram_matrices(model: torch.nn.Module, examples: list[tuple[list[int], int]], batch_size: int = 16) -> dict[str, Tensor]:
    """Mean input Gram matrix XᵀX/#tokens of every nn.Linear over the (non-padding) tokens of the examples."""
    device = next(model.parameters()).device
    grams: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[Tensor] = []  # the current batch's non-padding mask, read by the hooks

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0][keep[0]].float()  # (tokens, in)
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [
        module.register_forward_pre_hook(hook(f"{name}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        for start in range(0, len(examples), batch_size):
            batch = [ids for ids, _ in examples[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = True
            keep[:] = [mask]
            model(input_ids=input_ids, attention_mask=mask.long())
    finally:
        for handle in handles:
            handle.remove()
    return {name: g / counts[name] for name, g in grams.items()}


def save_stats(tensors: dict[str, Tensor], out: str | Path, metadata: dict[str, str], force: bool = False) -> Path:
    """Write a statistics file atomically (temp file + rename); an existing file needs `force`, a full disk
    is a DiskFullError with nothing left behind."""
    from safetensors.torch import save_file

    with atomic_output_file(out, force) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    return Path(out)


def compute_stats_file(
    kind: str,
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    force: bool = False,
) -> Path:
    """`mergetune stats fisher|gram`: compute the statistic of `model_dir` on `data` and save it to `out`."""
    if Path(out).exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    records = read_calibration(data, limit)
    weights = Checkpoint.open(model_dir).path  # safetensors weights, else a one-line error (no pickles)
    model, tokenizer = load_model(weights, device)
    examples = encode(tokenizer, records)
    tensors = diagonal_fisher(model, examples) if kind == "fisher" else gram_matrices(model, examples, batch_size)
    metadata = {"kind": kind, "examples": str(len(examples)), "model": str(model_dir), "data": str(data)}
    log.info("%s of %s over %d examples: %d tensors", kind, model_dir, len(examples), len(tensors))
    return save_stats(tensors, out, metadata, force=True)
