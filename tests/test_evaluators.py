"""Evaluators on a tiny zoo built here: lm-eval parity with its CLI, in-place rescoring, no files, failures, configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from mergetune.core.errors import ConfigError
from mergetune.evaluators.base import EvaluationFailed, HFBackend, build_evaluator, subset_indices
from mergetune.evaluators.stderr import standard_error
from mergetune.zoo.tokenizer import build_char_tokenizer

LM_EVAL_CLI = Path(sys.executable).parent / "lm_eval"
ITEMS = 12
MAX_NEW_TOKENS = 5


def tiny_llama(seed: int) -> LlamaForCausalLM:
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


GENERATE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {path}
test_split: {split}
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

LOGLIKELIHOOD_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {path}
test_split: {split}
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def reference_greedy(model: LlamaForCausalLM, tokenizer, prompt: str) -> str | None:
    """transformers' own greedy continuation up to EOS, or None when it holds a newline, special token or
    edge whitespace (where 'the answer' is ambiguous between evaluators)."""
    ids = tokenizer([prompt], return_tensors="pt")
    tokens = model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(tokens)
    if not tokens or set(tokens) & set(tokenizer.all_special_ids) or "\n" in text or text != text.strip():
        return None
    return text


def build_zoo(root: Path) -> Path:
    """Issue 2's zoo layout with one task `rev`: answers are the base model's own greedy outputs on every
    test item and on the even search items, so exact match is 1.0 on test and about 0.5 on search."""
    tokenizer = build_char_tokenizer()
    base, expert = tiny_llama(0), tiny_llama(1)
    for model, folder in ((base, root / "base"), (expert, root / "experts" / "rev")):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    letters = "abcdefgh"
    prompts = [f"rev {letters[i % 8]}{letters[(3 * i) % 8]}{letters[(5 * i + 1) % 8]}{i % 10}=" for i in range(2 * ITEMS)]
    outputs = [reference_greedy(base, tokenizer, prompt) for prompt in prompts]
    task_dir = root / "tasks" / "rev"
    task_dir.mkdir(parents=True)
    splits = {"search": prompts[:ITEMS], "test": prompts[ITEMS:]}
    for split, split_prompts in splits.items():
        offset = 0 if split == "search" else ITEMS
        records = []
        for i, prompt in enumerate(split_prompts):
            own = outputs[offset + i]
            usable = own is not None and (split == "test" or i % 2 == 0)
            records.append({"prompt": prompt, "answer": own if usable else "zzzzz"})
        write_jsonl(task_dir / f"{split}.jsonl", records)
        suffix = "_search" if split == "search" else ""
        path = task_dir / f"{split}.jsonl"
        (task_dir / f"zoo_rev{suffix}.yaml").write_text(
            GENERATE_YAML.format(name=f"zoo_rev{suffix}", split=split, path=path, max_new_tokens=MAX_NEW_TOKENS)
        )
        (task_dir / f"zoo_ppl{suffix}.yaml").write_text(LOGLIKELIHOOD_YAML.format(name=f"zoo_ppl{suffix}", split=split, path=path))
    manifest = {
        "preset": "test",
        "seed": 0,
        "base": "base",
        "experts": {"rev": "experts/rev"},
        "tasks": {
            "rev": {
                "splits": {s: f"tasks/rev/{s}.jsonl" for s in ("search", "test")},
                "max_new_tokens": MAX_NEW_TOKENS,
                "lm_eval": {"test": "zoo_rev", "search": "zoo_rev_search", "include_path": "tasks"},
            }
        },
    }
    (root / "zoo.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def lm_eval_config(zoo) -> dict:
    return {
        "kind": "lm_eval",
        "tasks": {"rev": {"search": "zoo_rev_search", "test": "zoo_rev"}, "ppl": {"search": "zoo_ppl_search", "test": "zoo_ppl"}},
        "include_path": str(zoo / "tasks"),
        "limit": 8,
        "batch_size": 4,
    }


@pytest.fixture(scope="module")
def lm_eval_evaluator(lm_eval_config):
    return build_evaluator(lm_eval_config)


@pytest.fixture(scope="module")
def quick_evaluator(zoo):
    return build_evaluator({"kind": "quick", "zoo": str(zoo), "metrics": ["exact_match", "logprob"]})


def fresh_backend(path: Path) -> HFBackend:
    return HFBackend.from_pretrained(path, "cpu")


def copy_weights(backend: HFBackend, source_dir: Path) -> None:
    """What a trial does: write every tensor through the backend's sink, in place."""
    from safetensors.torch import load_file

    sink = backend.weight_sink()
    for name, tensor in load_file(source_dir / "model.safetensors").items():
        sink.write(name, tensor)
    sink.close()


def run_cli(zoo: Path, out: Path, *selection: str) -> dict:
    """lm-eval's own CLI on the saved base model; the per-task results of its JSON output."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        str(LM_EVAL_CLI), "--model", "hf", "--model_args", f"pretrained={zoo / 'base'}", "--device", "cpu",
        "--batch_size", "4", "--include_path", str(zoo / "tasks"),
        "--tasks", "zoo_rev_search,zoo_ppl_search,zoo_rev", "--output_path", str(out), *selection,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]


def test_objectives_and_directions_come_from_lm_eval(lm_eval_evaluator, quick_evaluator):
    assert [(o.name, o.direction) for o in lm_eval_evaluator.objectives] == [("rev", "maximize"), ("ppl", "minimize")]
    assert [(o.name, o.direction) for o in quick_evaluator.objectives] == [("rev", "maximize"), ("rev.logprob", "maximize")]


def test_lm_eval_scores_equal_the_cli_with_limit(zoo, lm_eval_config, tmp_path):
    evaluator = build_evaluator({**lm_eval_config, "seed": None})  # lm-eval's own `limit`: the first items
    backend = fresh_backend(zoo / "base")
    cli = run_cli(zoo, tmp_path, "--limit", "8")
    ours = evaluator.evaluate(backend, split="search")
    assert ours["rev"] == cli["zoo_rev_search"]["exact_match,none"]
    assert ours["ppl"] == pytest.approx(cli["zoo_ppl_search"]["perplexity,none"], rel=1e-9)
    assert evaluator.evaluate(backend, split="test")["rev"] == cli["zoo_rev"]["exact_match,none"]
    assert 0 < ours["rev"] < 1 and cli["zoo_rev"]["exact_match,none"] > ours["rev"]


def test_seeded_subset_with_few_shot_equals_the_cli_with_the_same_samples(zoo, lm_eval_config, lm_eval_evaluator, tmp_path):
    samples = {name: subset_indices(ITEMS, 8, 0, name) for name in ("zoo_rev_search", "zoo_ppl_search", "zoo_rev")}
    assert samples["zoo_rev_search"] != list(range(8))  # a seeded draw, not the first items
    cli = run_cli(zoo, tmp_path, "--samples", json.dumps(samples), "--num_fewshot", "1")
    evaluator = build_evaluator({**lm_eval_config, "num_fewshot": 1})
    backend = fresh_backend(zoo / "base")
    for _ in range(2):  # the same few-shot examples on every call
        ours = evaluator.evaluate(backend, split="search")
        assert ours["rev"] == cli["zoo_rev_search"]["exact_match,none"]
        assert ours["ppl"] == pytest.approx(cli["zoo_ppl_search"]["perplexity,none"], rel=1e-9)
        assert evaluator.evaluate(backend, split="test")["rev"] == cli["zoo_rev"]["exact_match,none"]
    assert ours["ppl"] != lm_eval_evaluator.evaluate(backend)["ppl"]  # the shot is in the context


def test_rescoring_after_in_place_change_equals_fresh_load(zoo, lm_eval_evaluator, quick_evaluator):
    live = fresh_backend(zoo / "base")
    parameters = {name: p.data_ptr() for name, p in live.model.named_parameters()}
    before = {**lm_eval_evaluator.evaluate(live), **{f"q.{k}": v for k, v in quick_evaluator.evaluate(live).items()}}
    copy_weights(live, zoo / "experts" / "rev")
    after = {**lm_eval_evaluator.evaluate(live), **{f"q.{k}": v for k, v in quick_evaluator.evaluate(live).items()}}
    fresh = fresh_backend(zoo / "experts" / "rev")
    expected = {**lm_eval_evaluator.evaluate(fresh), **{f"q.{k}": v for k, v in quick_evaluator.evaluate(fresh).items()}}
    assert after == expected
    assert after["ppl"] != before["ppl"] and after["q.rev.logprob"] != before["q.rev.logprob"]
    assert parameters == {name: p.data_ptr() for name, p in live.model.named_parameters()}  # no reallocation
    copy_weights(live, zoo / "base")
    assert {**lm_eval_evaluator.evaluate(live), **{f"q.{k}": v for k, v in quick_evaluator.evaluate(live).items()}} == before


def test_quick_reads_the_zoo_and_scores_each_split(zoo, quick_evaluator):
    backend = fresh_backend(zoo / "base")
    search, test = quick_evaluator.evaluate(backend, split="search"), quick_evaluator.evaluate(backend, split="test")
    answers = [json.loads(line)["answer"] for line in (zoo / "tasks/rev/search.jsonl").read_text().splitlines()]
    assert search["rev"] == pytest.approx(sum(a != "zzzzz" for a in answers) / ITEMS)
    assert test["rev"] > search["rev"] > 0
    assert math.isfinite(search["rev.logprob"]) and search["rev.logprob"] < 0
    assert quick_evaluator.evaluate(backend) == search
    with pytest.raises(ValueError, match="split"):
        quick_evaluator.evaluate(backend, split="train")


def test_quick_agrees_with_lm_eval_on_the_same_items(zoo, lm_eval_evaluator):
    """Same task, items and greedy decoding: the quick evaluator's exact match is lm-eval's."""
    backend = fresh_backend(zoo / "base")
    quick = build_evaluator({"kind": "quick", "zoo": str(zoo)})
    lm_eval = build_evaluator({"kind": "lm_eval", "zoo": str(zoo)})
    for split in ("search", "test"):
        assert quick.evaluate(backend, split=split)["rev"] == lm_eval.evaluate(backend, split=split)["rev"]
    # and so are the per-item scores behind the SE; perplexity is no mean of its items: no SE
    quick_summary, lm_eval_summary = quick.summarise(backend)["rev"], lm_eval.summarise(backend)
    assert lm_eval_summary["rev"] == quick_summary and quick_summary["items"] == ITEMS
    assert quick_summary["se"] == pytest.approx(standard_error(quick.score_items(backend)["rev"]))
    with_ppl = lm_eval_evaluator.summarise(backend)
    assert with_ppl["ppl"]["se"] is None and with_ppl["ppl"]["score"] == lm_eval_evaluator.evaluate(backend)["ppl"]
    assert with_ppl["rev"]["se"] is not None and with_ppl["rev"]["items"] == 8


def test_quick_limit_is_a_fixed_seeded_subset(zoo):
    spelled = {"rev": {"search": str(zoo / "tasks/rev/search.jsonl"), "test": str(zoo / "tasks/rev/test.jsonl"), "max_new_tokens": 3}}
    by_count = build_evaluator({"kind": "quick", "tasks": spelled, "limit": 5, "seed": 3})
    by_fraction = build_evaluator({"kind": "quick", "tasks": spelled, "limit": 0.4, "seed": 3})
    again = build_evaluator({"kind": "quick", "tasks": spelled, "limit": 5, "seed": 3})
    other_seed = build_evaluator({"kind": "quick", "tasks": spelled, "limit": 5, "seed": 4})
    (task,) = by_count.tasks
    assert len(task.prompts["search"]) == 5 and task.max_new_tokens == 3
    assert task.prompts == again.tasks[0].prompts == by_fraction.tasks[0].prompts  # ceil(0.4 · 12) = 5
    assert task.prompts != other_seed.tasks[0].prompts


@given(size=st.integers(1, 500), limit=st.one_of(st.integers(1, 600), st.floats(0.001, 0.999)), seed=st.integers(0, 10**6))
def test_subset_indices_are_a_deterministic_sorted_sample(size, limit, seed):
    chosen = subset_indices(size, limit, seed, "task")
    expected = min(size, math.ceil(size * limit) if isinstance(limit, float) and limit < 1 else int(limit))
    assert len(chosen) == max(expected, 1) and len(set(chosen)) == len(chosen)
    assert chosen == sorted(chosen) and all(0 <= i < size for i in chosen)
    assert chosen == subset_indices(size, limit, seed, "task")


def test_no_file_is_written_per_trial(zoo, lm_eval_evaluator, quick_evaluator, tmp_path, monkeypatch):
    backend = fresh_backend(zoo / "base")
    writes: list[str] = []
    spying = [False]

    def spy(event: str, args: tuple) -> None:
        if spying[0] and event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing:
                writes.append(str(path))

    sys.addaudithook(spy)  # audit hooks cannot be removed; this one records only while `spying`
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    monkeypatch.chdir(readonly)
    spying[0] = True
    try:
        for _ in range(2):
            copy_weights(backend, zoo / "experts" / "rev")
            lm_eval_evaluator.evaluate(backend)
            quick_evaluator.evaluate(backend)
    finally:
        spying[0] = False
        readonly.chmod(0o755)
    assert writes == []
    assert list(readonly.iterdir()) == []


@pytest.fixture
def nan_backend(zoo) -> HFBackend:
    backend = fresh_backend(zoo / "base")
    sink = backend.weight_sink()
    sink.write("model.norm.weight", torch.full_like(backend.model.model.norm.weight, float("nan")))
    sink.close()
    return backend


def test_nan_logits_fail_the_evaluation(nan_backend, lm_eval_evaluator, quick_evaluator):
    for evaluator in (lm_eval_evaluator, quick_evaluator):
        with pytest.raises(EvaluationFailed, match="task rev: the model produced NaN or inf logits"):
            evaluator.evaluate(nan_backend)


def test_a_failing_task_fails_the_evaluation(zoo, lm_eval_evaluator, quick_evaluator):
    backend = fresh_backend(zoo / "base")

    def broken(module, args):
        raise RuntimeError("CUDA out of memory")

    handle = backend.model.register_forward_pre_hook(broken)
    for evaluator in (lm_eval_evaluator, quick_evaluator):
        with pytest.raises(EvaluationFailed, match="task rev: RuntimeError: CUDA out of memory"):
            evaluator.evaluate(backend)
    handle.remove()
    assert set(quick_evaluator.evaluate(backend)) == {"rev", "rev.logprob"}


def test_per_task_timeout_fails_the_evaluation(zoo, lm_eval_config):
    backend = fresh_backend(zoo / "base")
    for config in ({"kind": "quick", "zoo": str(zoo), "timeout_s": 1e-9}, {**lm_eval_config, "timeout_s": 1e-9}):
        with pytest.raises(EvaluationFailed, match="task rev: timed out"):
            build_evaluator(config).evaluate(backend)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"kind": "bleu"}, "evaluator: kind: 'bleu' is not an evaluator; use one of quick, lm_eval"),
        ({"zoo": "z"}, "evaluator: kind: None is not an evaluator"),
        ({"kind": "quick", "zoo": "z", "limt": 3}, "evaluator: limt: unknown key; allowed here: limit, seed, batch_size"),
        ({"kind": "quick"}, "evaluator: give either `zoo:` or `tasks:`"),
        ({"kind": "quick", "zoo": "z", "limit": 0}, "evaluator: limit: give a count ≥ 1 or a fraction in (0, 1)"),
        ({"kind": "quick", "zoo": "z", "limit": 1.5}, "evaluator: limit: give a count ≥ 1 or a fraction in (0, 1)"),
        ({"kind": "quick", "zoo": "z", "metrics": ["bleu"]}, "evaluator: metrics.0: Input should be 'exact_match' or 'logprob'"),
        ({"kind": "quick", "zoo": "/nonexistent"}, "evaluator: zoo: /nonexistent has no zoo.json"),
        ({"kind": "lm_eval"}, "evaluator: give `tasks:` (lm-eval task names) or `zoo:`"),
        ({"kind": "lm_eval", "tasks": ["a"], "backend": "tgi"}, "evaluator: backend: Input should be 'hf' or 'vllm'"),
        ({"kind": "lm_eval", "tasks": [{"name": "a", "metrc": "acc"}]}, "evaluator: tasks.0.metrc: unknown key"),
    ],
)
def test_config_errors_are_one_line(config, message):
    with pytest.raises(ConfigError) as caught:
        build_evaluator(config)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_lm_eval_config_errors_name_the_task_and_metric(lm_eval_config):
    with pytest.raises(ConfigError, match="evaluator: tasks: lm-eval cannot load task 'zoo_nope'"):
        build_evaluator({**lm_eval_config, "tasks": {"nope": "zoo_nope"}})
    with pytest.raises(ConfigError, match=r"evaluator: tasks.rev.metric: 'acc' is not a metric of 'zoo_rev_search'; it has exact_match"):
        build_evaluator({**lm_eval_config, "tasks": {"rev": {"search": "zoo_rev_search", "test": "zoo_rev", "metric": "acc"}}})


def test_lm_eval_task_spellings_and_metric_choice(zoo, lm_eval_config):
    listed = build_evaluator({**lm_eval_config, "tasks": [{"name": "zoo_ppl", "metric": "acc"}, "zoo_rev"]})
    assert [(o.name, o.direction) for o in listed.objectives] == [("zoo_ppl", "maximize"), ("zoo_rev", "maximize")]
    scores = listed.evaluate(fresh_backend(zoo / "base"))
    assert set(scores) == {"zoo_ppl", "zoo_rev"} and 0 <= scores["zoo_ppl"] <= 1


def test_greedy_generation_uses_no_deprecated_cache_argument_and_matches_transformers_generate():
    import warnings

    from mergetune.evaluators.generation import greedy_generate

    tokenizer = build_char_tokenizer()
    model = tiny_llama(3)
    prompts = ["rev abc=", "rev hgfe1=", "rev d="]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*(past_key_values|cache).*deprecated", category=FutureWarning)
        warnings.filterwarnings("error", message=r".*(past_key_values|cache).*deprecated")
        ours = greedy_generate(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=2)
    for prompt, text in zip(prompts, ours, strict=True):
        expected = reference_greedy(model, tokenizer, prompt)
        if expected is not None:
            assert text == expected
