"""Build a zoo: task data, a pretrained base, one SFT expert per task with Adam moments, lm-eval tasks, manifest."""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import save as safetensors_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from mergetune.core.errors import MergetuneError
from mergetune.core.fs import atomic_output_dir, check_output_dir, safetensors_disk_errors
from mergetune.evaluators.generation import exact_match, greedy_generate
from mergetune.zoo.presets import Preset, Schedule, get_preset
from mergetune.zoo.tasks import SHORTEST_WORD, SPLITS, TASKS, pretraining_records, task_splits
from mergetune.zoo.tokenizer import build_char_tokenizer
from mergetune.zoo.train import encode_examples, optimizer_metadata, second_moments, train

log = logging.getLogger(__name__)

MOMENTS_FILE = "adam_second_moments.safetensors"
# Acceptance of the demo preset (issue 2): experts must gain, the plain average must interfere.
MIN_EXPERT_GAIN = 0.15
MIN_AVERAGE_DROP = 0.10
MIN_TASKS_WITH_DROP = 2


class WeakZooError(MergetuneError):
    """A preset that requires the demo acceptance built a zoo that misses it (and --allow-weak was not given)."""


def model_config(preset: Preset, vocab_size: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-5,
        # Untied: a merge treats the embedding and the head as separate tensors, as in real 7B models.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lm_eval_task_yaml(task: str, split_file: Path, max_new_tokens: int, task_name: str) -> dict:
    """An lm-eval `generate_until` task over one local JSONL split, scored by exact match."""
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(split_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "zoo_task": task},
    }


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def save_moments(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file with its metadata in sorted order: safetensors writes it in hash order, which varies per run."""
    data = bytearray(safetensors_bytes(tensors, metadata=metadata))
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    # Same keys and values, so the compact JSON has the same length; safetensors pads headers with spaces.
    data[8 : 8 + header_len] = json.dumps(header, separators=(",", ":")).encode().ljust(header_len, b" ")
    path.write_bytes(bytes(data))


def average_state_dict(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The uniform average of the experts' weights (the naive merge the acceptance compares against)."""
    states = [m.state_dict() for m in models]
    return {name: sum(s[name] for s in states) / len(states) for name in states[0]}


def pretraining_mix(preset: Preset, splits: dict[str, dict], seed: int) -> list[dict[str, str]]:
    """The base's corpus: per task, as many items as its train split, on short words only, none held out."""
    count = dict(preset.split_sizes)["train"]
    records = []
    for task in preset.tasks:
        held_out = {r["prompt"] for split in ("search", "test") for r in splits[task][split]}
        records += pretraining_records(TASKS[task], count, seed, held_out)
    return records


def sft_mix(preset: Preset, splits: dict[str, dict], pretraining: list[dict[str, str]], task: str, seed: int) -> list[dict[str, str]]:
    """An expert's SFT items: its task's train split plus a seeded replay of the pretraining mix (`sft_replay` of the total)."""
    own = splits[task]["train"]
    replayed = round(len(own) * preset.sft_replay / (1 - preset.sft_replay))
    return own + random.Random(f"replay:{task}:{seed}").sample(pretraining, min(replayed, len(pretraining)))


def accuracy_on_test(model, tokenizer, splits: dict[str, dict], preset: Preset) -> dict[str, float]:
    """Exact match of greedy answers on each task's test split."""
    accuracy = {}
    for task in preset.tasks:
        records = splits[task]["test"]
        predictions = greedy_generate(model, tokenizer, [r["prompt"] for r in records], TASKS[task].max_new_tokens)
        accuracy[task] = exact_match(predictions, [r["answer"] for r in records])
    return accuracy


def acceptance(base: dict[str, float], experts: dict[str, dict[str, float]], average: dict[str, float]) -> dict:
    """The demo figures (issues 2, 19): each expert's gain over the base on its task; the average's drop below the expert."""
    gains = {task: experts[task][task] - base[task] for task in experts}
    drops = {task: experts[task][task] - average[task] for task in experts}
    experts_gain = all(g >= MIN_EXPERT_GAIN - 1e-9 for g in gains.values())
    average_interferes = sum(d >= MIN_AVERAGE_DROP - 1e-9 for d in drops.values()) >= MIN_TASKS_WITH_DROP
    return {
        "expert_gain": gains,
        "average_drop": drops,
        "min_expert_gain": MIN_EXPERT_GAIN,
        "min_average_drop": MIN_AVERAGE_DROP,
        "min_tasks_with_drop": MIN_TASKS_WITH_DROP,
        "passed": experts_gain and average_interferes,
    }


def acceptance_shortfall(figures: dict) -> str:
    """What the zoo misses of the acceptance, in words ("" when it passed)."""
    misses = [
        f"expert {task} gains {100 * gain:+.1f} points on its task (needs ≥ {100 * figures['min_expert_gain']:.0f})"
        for task, gain in figures["expert_gain"].items()
        if gain < figures["min_expert_gain"] - 1e-9
    ]
    dropped = sum(d >= figures["min_average_drop"] - 1e-9 for d in figures["average_drop"].values())
    if dropped < figures["min_tasks_with_drop"]:
        misses.append(
            f"the uniform average is ≥ {100 * figures['min_average_drop']:.0f} points below the expert on {dropped} "
            f"task(s) (needs {figures['min_tasks_with_drop']})"
        )
    return "; ".join(misses)


def accuracy_table(accuracy: dict, tasks: tuple[str, ...], required: bool) -> Table:
    verdict = "passed" if accuracy["acceptance"]["passed"] else ("not met" if required else "not met (not required)")
    table = Table(title=f"exact match (%) on the test splits; demo acceptance (gain ≥ 15, average drop ≥ 10 on ≥ 2 tasks): {verdict}")
    table.add_column("model")
    for task in tasks:
        table.add_column(task, justify="right")
    rows = [("base", accuracy["base"])]
    rows += [(f"expert {name}", acc) for name, acc in accuracy["experts"].items()]
    rows.append(("uniform average", accuracy["uniform_average"]))
    for label, acc in rows:
        table.add_row(label, *(f"{100 * acc[t]:.1f}" for t in tasks))
    return table


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _train_with_progress(progress: Progress, label: str, model, examples, schedule: Schedule, **kwargs):
    bar = progress.add_task(label, total=schedule.steps, loss=float("nan"))
    started = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        progress.update(bar, completed=step + 1, loss=loss)
        # Without a terminal the bar only shows at the end; log milestones for build logs.
        if not progress.console.is_terminal and (step + 1) % 100 == 0:
            log.info("%s: step %d/%d, loss %.3f, %.1f s", label, step + 1, schedule.steps, loss, time.perf_counter() - started)

    return train(model, examples, schedule, on_step=on_step, **kwargs)


def build_zoo(
    out: str | Path,
    preset_name: str = "demo",
    seed: int = 0,
    force: bool = False,
    console: Console | None = None,
    allow_weak: bool = False,
) -> dict:
    """Build a zoo into `out` (atomically) and return its manifest (also written to `out/zoo.json`).

    The base is pretrained on every task's short words; each expert is fine-tuned on its task's
    train split (all word lengths) with a replay of that mix. A preset that requires the
    acceptance raises WeakZooError when the zoo misses it, and writes nothing, unless `allow_weak`.
    The same preset and seed give the same checkpoint bytes on the same machine and thread count.
    """
    preset = get_preset(preset_name)
    out = Path(out).absolute()
    check_output_dir(out, force)  # before minutes of training, not after
    console = console or Console(stderr=True)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    tokenizer = build_char_tokenizer()
    sizes = dict(preset.split_sizes)
    splits = {task: task_splits(TASKS[task], sizes, seed) for task in preset.tasks}

    with atomic_output_dir(out, force) as tmp, safetensors_disk_errors():
        task_entries = {}
        for task in preset.tasks:
            task_dir = tmp / "tasks" / task
            task_dir.mkdir(parents=True)
            for split in SPLITS:
                write_jsonl(task_dir / f"{split}.jsonl", splits[task][split])
            # lm-eval needs absolute data paths: point at where the zoo lands after the rename.
            for suffix, split in (("", "test"), ("_search", "search")):
                name = f"zoo_{task}{suffix}"
                spec = lm_eval_task_yaml(task, out / "tasks" / task / f"{split}.jsonl", TASKS[task].max_new_tokens, name)
                (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            task_entries[task] = {
                "splits": {split: f"tasks/{task}/{split}.jsonl" for split in SPLITS},
                "max_new_tokens": TASKS[task].max_new_tokens,
                "lm_eval": {"test": f"zoo_{task}", "search": f"zoo_{task}_search", "include_path": "tasks"},
            }

        config = model_config(preset, len(tokenizer), tokenizer)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            base = LlamaForCausalLM(config)
        pretraining = pretraining_mix(preset, splits, seed)
        pretrain_examples = encode_examples(tokenizer, pretraining)
        losses: dict[str, float] = {}
        moment_meta: dict[str, dict[str, str]] = {}
        experts: dict[str, LlamaForCausalLM] = {}
        with _progress(console) as progress:
            t0 = time.perf_counter()
            _, losses["pretrain"] = _train_with_progress(
                progress, "pretrain base", base, pretrain_examples, preset.pretrain,
                pad_id=tokenizer.pad_token_id, answer_only=False, seed=seed,
            )
            timings["pretrain_seconds"] = time.perf_counter() - t0
            base.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            for index, task in enumerate(preset.tasks):
                t0 = time.perf_counter()
                expert = copy.deepcopy(base)
                sft_examples = encode_examples(tokenizer, sft_mix(preset, splits, pretraining, task, seed))
                optimizer, losses[task] = _train_with_progress(
                    progress, f"sft {task}", expert, sft_examples, preset.sft,
                    pad_id=tokenizer.pad_token_id, answer_only=True, seed=seed * 1000 + index + 1,
                )
                expert_dir = tmp / "experts" / task
                expert.save_pretrained(expert_dir)
                tokenizer.save_pretrained(expert_dir)
                moment_meta[task] = optimizer_metadata(optimizer)
                save_moments(second_moments(expert, optimizer), expert_dir / MOMENTS_FILE, moment_meta[task])
                del optimizer
                experts[task] = expert
                timings[f"sft_{task}_seconds"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        average = copy.deepcopy(base)
        average.load_state_dict(average_state_dict(list(experts.values())))
        accuracy = {
            "split": "test",
            "base": accuracy_on_test(base, tokenizer, splits, preset),
            "experts": {task: accuracy_on_test(model, tokenizer, splits, preset) for task, model in experts.items()},
            "uniform_average": accuracy_on_test(average, tokenizer, splits, preset),
        }
        accuracy["acceptance"] = acceptance(accuracy["base"], accuracy["experts"], accuracy["uniform_average"])
        accuracy["acceptance"]["required"] = preset.requires_acceptance
        timings["evaluation_seconds"] = time.perf_counter() - t0
        if preset.requires_acceptance and not accuracy["acceptance"]["passed"] and not allow_weak:
            console.print(accuracy_table(accuracy, preset.tasks, required=True))
            raise WeakZooError(
                f"zoo {preset.name} (seed {seed}) misses its acceptance: {acceptance_shortfall(accuracy['acceptance'])}; "
                "nothing was written — try another --seed, or pass --allow-weak to keep it"
            )
        timings["cpu_seconds"] = time.process_time() - cpu_start

        manifest = {
            "preset": preset.name,
            "seed": seed,
            "base": "base",
            "experts": {task: f"experts/{task}" for task in preset.tasks},
            "tasks": task_entries,
            "model": {
                "architecture": "LlamaForCausalLM",
                "hidden_size": preset.hidden_size,
                "intermediate_size": preset.intermediate_size,
                "num_layers": preset.num_layers,
                "num_heads": preset.num_heads,
                "vocab_size": len(tokenizer),
                "parameters": sum(p.numel() for p in base.parameters()),
            },
            "training": {
                "split_sizes": sizes,
                "pretrain_word_lengths": {t: [SHORTEST_WORD, TASKS[t].pretrain_max_letters] for t in preset.tasks},
                "word_lengths": {t: list(TASKS[t].lengths) for t in preset.tasks},
                "sft_replay": preset.sft_replay,
                "pretrain": asdict(preset.pretrain),
                "sft": asdict(preset.sft),
                "final_loss": losses,
                "adam_moments": moment_meta,
                "torch_threads": torch.get_num_threads(),
                **timings,
            },
            "accuracy": accuracy,
            "build_seconds": time.perf_counter() - wall_start,
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(accuracy_table(accuracy, preset.tasks, preset.requires_acceptance))
    console.print(
        f"zoo {preset.name} (seed {seed}) built in {manifest['build_seconds']:.0f} s wall, "
        f"{timings['cpu_seconds']:.0f} s CPU, {torch.get_num_threads()} threads → {out}",
        markup=False,
    )
    return manifest
