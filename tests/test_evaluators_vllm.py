"""The vLLM backend around a fake engine (no GPU, no vLLM here): arguments, names, the in-place update sequence."""

from __future__ import annotations

import json
import pickle
import time
import types
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from mergetune.core.config import load_yaml
from mergetune.evaluators.base import EvaluationFailed, HFBackend, build_evaluator, load_backend, validate_evaluator_config
from mergetune.evaluators.lmeval import LmEvalConfig
from mergetune.evaluators.vllm import VLLMBackend, push_weights, vllm_model_args, vllm_weight_name

CONFIGS = Path(__file__).parent.parent / "configs"


class FakeVllmModel:
    """Stands for the nn.Module inside a vLLM worker: records what its `load_weights` received."""

    def __init__(self) -> None:
        self.received: list[list[tuple[str, torch.Tensor]]] = []

    def load_weights(self, weights):
        weights = list(weights)
        self.received.append(weights)
        return {name for name, _ in weights}


class FakeLLM:
    """Stands for `vllm.LLM`: `apply_model` ships the function to the worker (pickled, as across processes)."""

    def __init__(self) -> None:
        self.worker_model = FakeVllmModel()
        self.calls: list[str] = []

    def apply_model(self, func):
        self.calls.append("apply_model")
        return [pickle.loads(pickle.dumps(func))(self.worker_model)]

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True


class FakeVLLMModel(LM):
    """Stands for lm-eval's `VLLM`: answers every prompt with `answers[prompt]` after `delay_s`."""

    def __init__(self, answers: dict[str, str], delay_s: float = 0.0, **kwargs) -> None:
        super().__init__()
        self.model = FakeLLM()
        self.answers = answers
        self.delay_s = delay_s
        self.kwargs = kwargs

    def generate_until(self, requests, disable_tqdm: bool = False):
        time.sleep(self.delay_s)
        return [self.answers.get(request.args[0], "?") for request in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_cluster_example_evaluator_validates():
    evaluator = load_yaml(CONFIGS / "llama3-8b-cluster.yaml")["evaluator"]
    config = validate_evaluator_config(evaluator)
    assert isinstance(config, LmEvalConfig) and config.backend == "vllm" and config.batch_size == "auto"
    assert [(t.name, t.metric, t.limit) for t in config.tasks] == [
        ("gsm8k", "exact_match,strict-match", 200),
        ("arc_challenge", "acc_norm", 300),
        ("ifeval", "prompt_level_strict_acc", 150),
    ]
    assert config.tasks[0].lm_eval_task("search") == config.tasks[0].lm_eval_task("test") == "gsm8k"


def test_vllm_model_args_pass_everything_through():
    args = vllm_model_args("/models/merged", {"gpu_memory_utilization": 0.85, "max_model_len": 4096, "dtype": "bfloat16"}, 32)
    assert args == {
        "pretrained": "/models/merged",
        "batch_size": 32,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
        "dtype": "bfloat16",
    }


def test_load_backend_builds_lm_evals_vllm_model(monkeypatch):
    module = types.ModuleType("lm_eval.models.vllm_causallms")
    module.VLLM = lambda **kwargs: FakeVLLMModel({}, **kwargs)
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.models.vllm_causallms", module)
    config = {
        "kind": "lm_eval",
        "backend": "vllm",
        "tasks": ["gsm8k"],
        "batch_size": "auto",
        "model_args": {"gpu_memory_utilization": 0.5, "enforce_eager": True},
        "weight_renames": [["^base_model\\.model\\.", ""]],
    }
    backend = load_backend(config, "/models/base", "cuda")
    assert isinstance(backend, VLLMBackend)
    assert backend.lm.kwargs == {"pretrained": "/models/base", "batch_size": "auto", "gpu_memory_utilization": 0.5, "enforce_eager": True}
    assert backend.renames == [("^base_model\\.model\\.", "")]
    assert backend.lm_eval_model("auto", {}) is backend.lm


@pytest.mark.parametrize(
    "name, renames, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", [], "model.layers.0.self_attn.q_proj.weight"),
        ("lm_head.weight", [], "lm_head.weight"),
        ("base_model.model.model.embed_tokens.weight", [("^base_model\\.model\\.", "")], "model.embed_tokens.weight"),
        ("model.layers.1.mlp.up_proj.weight", [("^model\\.", "language_model.model."), ("mlp", "feed_forward")],
         "language_model.model.layers.1.feed_forward.up_proj.weight"),
    ],
)  # fmt: skip
def test_weight_names_map_to_vllms_loader(name, renames, expected):
    assert vllm_weight_name(name, renames) == expected


def test_sink_pushes_all_weights_once_at_close_then_resets_the_prefix_cache():
    backend = VLLMBackend(FakeVLLMModel({}), renames=[("^base_model\\.model\\.", "")])
    q = torch.randn(4, 4)
    sink = backend.weight_sink()
    sink.write("base_model.model.model.layers.0.self_attn.q_proj.weight", q)
    sink.write("model.norm.weight", torch.ones(4))
    assert backend.llm.calls == []  # nothing reaches the engine mid-merge
    sink.close()
    assert backend.llm.calls == ["apply_model", "reset_prefix_cache"]
    (received,) = backend.llm.worker_model.received
    assert [name for name, _ in received] == ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    assert torch.equal(received[0][1], q)
    sink.close()
    assert backend.llm.calls == ["apply_model", "reset_prefix_cache"]


def test_push_weights_returns_what_each_worker_loaded():
    llm = FakeLLM()
    assert push_weights(llm, [("a.weight", torch.zeros(2)), ("b.weight", torch.zeros(2))]) == [2]
    assert llm.calls == ["apply_model", "reset_prefix_cache"]


@pytest.fixture
def task_config(tmp_path) -> dict:
    records = [{"prompt": f"copy {i}=", "answer": str(i)} for i in range(6)]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "copy.yaml").write_text(
        f"task: fake_copy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return {"kind": "lm_eval", "backend": "vllm", "tasks": {"copy": "fake_copy"}, "include_path": str(tmp_path)}


def test_lm_eval_scores_through_the_vllm_backend(task_config):
    answers = {f"copy {i}=": str(i) if i < 3 else "x" for i in range(6)}
    backend = VLLMBackend(FakeVLLMModel(answers))
    evaluator = build_evaluator(task_config)
    assert evaluator.evaluate(backend) == {"copy": 0.5}
    assert build_evaluator({**task_config, "limit": 3, "seed": None}).evaluate(backend, split="test") == {"copy": 1.0}


def test_vllm_task_over_its_timeout_fails_after_it_ran(task_config):
    backend = VLLMBackend(FakeVLLMModel({}, delay_s=0.05))
    with pytest.raises(EvaluationFailed, match="task copy: timed out"):
        build_evaluator({**task_config, "timeout_s": 0.01}).evaluate(backend)


def test_a_vllm_config_refuses_an_hf_backend(task_config):
    hf = HFBackend(torch.nn.Linear(2, 2), tokenizer=None)
    with pytest.raises(EvaluationFailed, match="backend: vllm needs a VLLMBackend"):
        build_evaluator(task_config).evaluate(hf)


def test_search_worker_scores_through_the_backend_its_evaluator_asks_for(monkeypatch, tmp_path):
    """A study with `evaluator.backend: vllm` gets a vLLM engine in each worker, merged into in place."""
    from test_studies_fixtures import build_tiny_models

    import mergetune.evaluators.base as evaluators_base
    from mergetune.search.config import parse_study_config
    from mergetune.search.workers import TrialWorker

    module = types.ModuleType("lm_eval.models.vllm_causallms")
    module.VLLM = lambda **kwargs: FakeVLLMModel({}, **kwargs)
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.models.vllm_causallms", module)
    scored = []

    class RecordingEvaluator:
        objectives = []

        def evaluate(self, backend, split="search"):
            scored.append(backend)
            return {"gsm8k": 0.5}

    monkeypatch.setattr(evaluators_base, "build_evaluator", lambda config: RecordingEvaluator())
    models = build_tiny_models(tmp_path)
    config = parse_study_config(
        {
            "study": "vllm",
            "models": {"base": models["base"], "experts": {"math": models["math"], "code": models["code"]}},
            "evaluator": {"kind": "lm_eval", "backend": "vllm", "tasks": ["gsm8k"]},
            "ray": {"device": "cpu"},
        },
        "test",
    )
    worker = TrialWorker(config.model_dump_json())
    assert isinstance(worker.backend, VLLMBackend)
    recipe = {"models": {"base": models["base"], "math": models["math"], "code": models["code"]}, "base": "base",
              "rules": [{"match": "*", "method": "linear"}]}  # fmt: skip
    result = worker.run(recipe, seed=0)
    assert result["scores"] == {"gsm8k": 0.5} and scored == [worker.backend]
    pushed = worker.backend.lm.model.worker_model.received
    assert len(pushed) == 1 and {name for name, _ in pushed[0]} >= {"model.embed_tokens.weight", "lm_head.weight"}
