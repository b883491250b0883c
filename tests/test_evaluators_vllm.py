"""The vLLM backend around a fake engine (no GPU, no vLLM here): arguments, names, the in-place update sequence."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
import torch
from fake_vllm import FakeLLM
from lm_eval.api.model import LM

from mergetune.core.config import load_yaml
from mergetune.core.errors import ConfigError
from mergetune.evaluators.base import EvaluationFailed, HFBackend, build_evaluator, load_backend, validate_evaluator_config
from mergetune.evaluators.config import VLLM_WORKER_EXTENSION as WORKER_EXTENSION
from mergetune.evaluators.lmeval import LmEvalConfig
from mergetune.evaluators.vllm import (
    SUPPORTED_VLLM,
    VLLMBackend,
    check_vllm_version,
    vllm_model_args,
    vllm_weight_name,
)
from mergetune.evaluators.vllm_push import EngineInfo, choose_transport
from mergetune.evaluators.vllm_worker import MergetuneWorkerExtension

CONFIGS = Path(__file__).parent.parent / "configs"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def fake_llm(vllm_engine_core) -> FakeLLM:
    """A fresh one-tensor engine, for tests about scoring rather than pushes."""
    return FakeLLM(vllm_engine_core, {"w": [2]})


@pytest.fixture
def vllm_installed(monkeypatch):
    """`VLLMBackend.from_pretrained` sees a supported vLLM and builds lm-eval's VLLM around the fake engine."""
    import mergetune.evaluators.vllm as vllm_backend

    monkeypatch.setattr(vllm_backend, "installed_vllm_version", lambda: "0.33.0")

    def install(llm: FakeLLM) -> None:
        module = types.ModuleType("lm_eval.models.vllm_causallms")
        module.VLLM = lambda **kwargs: FakeVLLMModel(llm, {}, **kwargs)
        monkeypatch.setitem(__import__("sys").modules, "lm_eval.models.vllm_causallms", module)

    return install


class FakeVLLMModel(LM):
    """Stands for lm-eval's `VLLM` around an engine: answers every prompt with `answers[prompt]` after `delay_s`."""

    def __init__(self, llm: FakeLLM, answers: dict[str, str], delay_s: float = 0.0, **kwargs) -> None:
        super().__init__()
        self.model = llm
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


def test_vllm_model_args_pass_everything_through_and_add_the_worker_extension():
    args = vllm_model_args("/models/merged", {"gpu_memory_utilization": 0.85, "max_model_len": 4096, "dtype": "bfloat16"}, 32)
    assert args == {
        "pretrained": "/models/merged",
        "batch_size": 32,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
        "dtype": "bfloat16",
        "worker_extension_cls": "mergetune.evaluators.vllm_worker.MergetuneWorkerExtension",
    }


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"data_parallel_size": 2}, "model_args.data_parallel_size: 2 is not supported with backend: vllm; .* more trial workers"),
        ({"tensor_parallel_size": 2}, "model_args.tensor_parallel_size: 2 is not supported"),
        ({"pipeline_parallel_size": 4}, "model_args.pipeline_parallel_size: 4 is not supported"),
        ({"worker_extension_cls": "my.Ext"}, "installs its own .*; remove 'my.Ext'"),
    ],
)
def test_engine_settings_a_push_would_miss_are_refused_in_one_line(model_args, message):
    with pytest.raises(ConfigError, match=message) as error:
        vllm_model_args("/m", model_args)
    assert "\n" not in str(error.value)


def test_an_lm_eval_model_without_one_engine_is_refused():
    """lm-eval's VLLM with data_parallel_size > 1 keeps no `.model`: merges would silently miss it."""
    with pytest.raises(ConfigError, match="no single engine .* more trial workers"):
        VLLMBackend(types.SimpleNamespace(data_parallel_size=2))


@pytest.mark.parametrize("version", ["0.16.0", "0.20.2", "0.33.0", "0.33.1.dev4+gabc"])
def test_supported_vllm_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize(
    "version, message",
    [
        (None, "needs vLLM, which is not installed; pip install 'mergetune\\[vllm\\]'"),
        ("0.15.1", "supports vLLM >=0.16,<0.34, but vLLM 0.15.1 is installed"),
        ("0.34.0", "but vLLM 0.34.0 is installed"),
        ("banana", "but vLLM banana is installed"),
    ],
)
def test_other_vllm_versions_fail_at_startup_in_one_line(version, message, monkeypatch):
    import mergetune.evaluators.vllm as vllm_backend

    with pytest.raises(ConfigError, match=message):
        check_vllm_version(version)
    monkeypatch.setattr(vllm_backend, "installed_vllm_version", lambda: version)
    with pytest.raises(ConfigError, match=message):  # before any engine is built
        VLLMBackend.from_pretrained("/models/base", {})


def test_the_vllm_extra_pins_the_supported_range():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm{SUPPORTED_VLLM}"]


def test_worker_extension_names_do_not_clash_with_vllms_worker():
    """vLLM refuses an extension whose attributes its worker class already has (checked on vLLM's source)."""
    import ast

    from real_vllm import real_vllm_paths

    source = Path(real_vllm_paths()[0]) / "vllm" / "v1" / "worker"
    worker_attrs: set[str] = set()
    for path, cls in (("gpu_worker.py", "Worker"), ("worker_base.py", "WorkerBase")):
        tree = ast.parse((source / path).read_text())
        (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        worker_attrs |= {n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        worker_attrs |= {t.id for n in node.body if isinstance(n, ast.Assign | ast.AnnAssign) for t in ast.walk(n) if isinstance(t, ast.Name)}
    assert {"load_model", "get_model", "update_weights"} <= worker_attrs  # the parse found the real classes
    ours = {name for name in dir(MergetuneWorkerExtension) if not name.startswith("__")}
    assert ours and all(name.startswith("mergetune_") for name in ours)
    assert not ours & worker_attrs


def test_cuda_ipc_is_chosen_only_for_another_process_on_the_same_gpu(monkeypatch):
    import os

    import mergetune.evaluators.vllm_push as vllm_push

    def info(pid: int, uuid: str | None) -> EngineInfo:
        return EngineInfo(pid=pid, rank=0, world_size=1, dtype=torch.bfloat16, device="cuda:0", device_uuid=uuid, quantization=None)

    monkeypatch.setattr(vllm_push, "cuda_device_uuid", lambda device: "GPU-1" if device.type == "cuda" else None)
    cuda = torch.device("cuda")
    assert choose_transport(info(os.getpid() + 1, "GPU-1"), cuda) == "cuda_ipc"
    assert choose_transport(info(os.getpid(), "GPU-1"), cuda) == "shm"  # in-process engine: a handle cannot reopen here
    assert choose_transport(info(os.getpid() + 1, "GPU-2"), cuda) == "shm"  # another GPU
    assert choose_transport(info(os.getpid() + 1, None), torch.device("cpu")) == "shm"  # a merge on the host


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


def test_load_backend_starts_lm_evals_vllm_model_with_the_worker_extension(vllm_installed, fake_llm):
    vllm_installed(fake_llm)
    config = {
        "kind": "lm_eval",
        "backend": "vllm",
        "tasks": ["gsm8k"],
        "batch_size": "auto",
        "model_args": {"gpu_memory_utilization": 0.5, "max_model_len": 2048},
        "weight_renames": [["^base_model\\.model\\.", ""]],
        "push_bucket_mib": 64,
    }
    backend = load_backend(config, "/models/base", "cpu")
    assert isinstance(backend, VLLMBackend)
    assert backend.lm.kwargs == {
        "pretrained": "/models/base",
        "batch_size": "auto",
        "gpu_memory_utilization": 0.5,
        "max_model_len": 2048,
        "worker_extension_cls": WORKER_EXTENSION,
    }
    assert backend.renames == [("^base_model\\.model\\.", "")]
    assert backend.pusher.bucket_bytes == 64 * 2**20 and backend.pusher.transport == "shm"
    assert backend.lm_eval_model("auto", {}) is backend.lm
    assert fake_llm.calls == ["mergetune_engine_info"]


def test_renamed_tensors_reach_the_engine_under_vllms_names(vllm_engine_core):
    llm = FakeLLM(vllm_engine_core, {"model.norm.weight": [4], "model.layers.0.self_attn.q_proj.weight": [4, 4]})
    backend = VLLMBackend(FakeVLLMModel(llm, {}), renames=[("^base_model\\.model\\.", "")])
    q = torch.randn(4, 4)
    sink = backend.weight_sink()
    sink.write("base_model.model.model.layers.0.self_attn.q_proj.weight", q)
    sink.write("base_model.model.model.norm.weight", torch.ones(4))
    assert llm.calls == ["mergetune_engine_info"]  # the bucket is not full: nothing sent mid-merge
    sink.close()
    assert llm.calls[1:] == ["mergetune_begin_push", "mergetune_load_bucket", "mergetune_end_push", "reset_prefix_cache"]
    weights = llm.weights()
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], q) and torch.equal(weights["model.norm.weight"], torch.ones(4))


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


def test_lm_eval_scores_through_the_vllm_backend(task_config, fake_llm):
    answers = {f"copy {i}=": str(i) if i < 3 else "x" for i in range(6)}
    backend = VLLMBackend(FakeVLLMModel(fake_llm, answers))
    evaluator = build_evaluator(task_config)
    assert evaluator.evaluate(backend) == {"copy": 0.5}
    assert build_evaluator({**task_config, "limit": 3, "seed": None}).evaluate(backend, split="test") == {"copy": 1.0}


def test_vllm_task_over_its_timeout_fails_after_it_ran(task_config, fake_llm):
    backend = VLLMBackend(FakeVLLMModel(fake_llm, {}, delay_s=0.05))
    with pytest.raises(EvaluationFailed, match="task copy: timed out"):
        build_evaluator({**task_config, "timeout_s": 0.01}).evaluate(backend)


def test_a_vllm_config_refuses_an_hf_backend(task_config):
    hf = HFBackend(torch.nn.Linear(2, 2), tokenizer=None)
    with pytest.raises(EvaluationFailed, match="backend: vllm needs a VLLMBackend"):
        build_evaluator(task_config).evaluate(hf)


@pytest.fixture
def vllm_study(tmp_path, vllm_engine_core, vllm_installed, monkeypatch):
    """A study config with `evaluator.backend: vllm` on the tiny models, its engine the fake; the evaluator records."""
    from test_studies_fixtures import build_tiny_models

    import mergetune.evaluators.base as evaluators_base
    from mergetune.merge.modelset import Checkpoint
    from mergetune.search.config import parse_study_config

    models = build_tiny_models(tmp_path)
    llm = FakeLLM(vllm_engine_core, {n: list(i.shape) for n, i in Checkpoint.open(models["base"]).infos.items()})
    vllm_installed(llm)
    scored = []

    class RecordingEvaluator:
        objectives = []

        def evaluate(self, backend, split="search"):
            scored.append(backend)
            return {"gsm8k": 0.5}

        def summarise(self, backend, split="search"):  # what the search worker calls: scores with their SE
            return {name: {"score": v, "se": None, "items": 1} for name, v in self.evaluate(backend, split).items()}

    monkeypatch.setattr(evaluators_base, "build_evaluator", lambda config: RecordingEvaluator())
    config = parse_study_config(
        {
            "study": "vllm",
            "models": {"base": models["base"], "experts": {"math": models["math"], "code": models["code"]}},
            "evaluator": {"kind": "lm_eval", "backend": "vllm", "tasks": ["gsm8k"]},
            "ray": {"device": "cpu"},
        },
        "test",
    )
    recipe = {"models": {"base": models["base"], "math": models["math"], "code": models["code"]}, "base": "base",
              "rules": [{"match": "*", "method": "linear"}]}  # fmt: skip
    return types.SimpleNamespace(config=config, llm=llm, recipe=recipe, scored=scored, base=models["base"])


def test_search_worker_scores_through_the_backend_its_evaluator_asks_for(vllm_study):
    """A study with `evaluator.backend: vllm` gets a vLLM engine in each worker, merged into in place."""
    from mergetune.search.workers import TrialWorker

    worker = TrialWorker(vllm_study.config.model_dump_json())
    assert isinstance(worker.backend, VLLMBackend)
    result = worker.run(vllm_study.recipe, seed=0)
    assert result["scores"] == {"gsm8k": 0.5} and vllm_study.scored == [worker.backend]
    from safetensors.torch import load_file

    pushed = vllm_study.llm.weights()
    experts = [load_file(Path(vllm_study.recipe["models"][e]) / "model.safetensors") for e in ("math", "code")]
    assert set(pushed) == set(experts[0])
    for name, tensor in pushed.items():  # linear, equal weights: the experts' average
        torch.testing.assert_close(tensor, (experts[0][name] + experts[1][name]) / 2, rtol=0, atol=1e-6)


def test_a_prefix_cache_that_stays_dirty_fails_the_trial_with_the_reason(vllm_study):
    from mergetune.search.workers import TrialWorker

    worker = TrialWorker(vllm_study.config.model_dump_json())
    worker.backend.pusher.reset_first_wait_s = 0.001
    vllm_study.llm.refuse_resets(100)
    result = worker.run(vllm_study.recipe, seed=0)
    assert "scores" not in result and vllm_study.scored == []
    assert result["error"].startswith("evaluation failed: vLLM's prefix cache could not be reset after the weight push")
