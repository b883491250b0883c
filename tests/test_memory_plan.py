"""The memory plan (`mergetune plan`, and `mergetune run`'s check) on real shapes, from headers only.

Llama-3-8B and Llama-3-70B stand-ins are sparse safetensors files with the exact tensor names
and shapes (from transformers' LlamaConfig on the meta device): the plan must never read them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from sparse_checkpoints import llama3_config, tensor_shapes, write_sparse_checkpoint, write_sparse_moments
from test_studies_fixtures import build_tiny_models

from mergetune.cli.main import main
from mergetune.merge.memory_plan import GiB, MethodUse, workspace_bytes
from mergetune.merge.method_memory import PeakAllocations
from mergetune.merge.methods import get_method
from mergetune.merge.modelset import ModelSet
from mergetune.merge.recipe import Recipe
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.sinks import LiveModelSink

CLUSTER_CONFIG = Path(__file__).parents[1] / "configs" / "llama3-8b-cluster.yaml"
EXPERTS = ("instruct", "math", "chatqa")


def _sparse_models(root: Path, size: str) -> dict[str, str]:
    config = llama3_config(size)
    return {name: str(write_sparse_checkpoint(root / name, config)) for name in ("base", *EXPERTS)}


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> dict[str, str]:
    return _sparse_models(tmp_path_factory.mktemp("llama3-8b"), "8b")


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> dict[str, str]:
    return _sparse_models(tmp_path_factory.mktemp("llama3-70b"), "70b")


def cluster_config(tmp_path: Path, models: dict[str, str], **changes) -> Path:
    """The shipped 8B cluster config, pointed at `models`, with `changes` merged into its sections."""
    data = yaml.safe_load(CLUSTER_CONFIG.read_text())
    data["models"] = {"base": models["base"], "experts": {e: models[e] for e in EXPERTS}}
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_plan(capsys, config: Path, *flags: str) -> tuple[int, dict, str]:
    with pytest.raises(SystemExit) as info:
        main(["plan", str(config), *flags, "--json"])
        raise SystemExit(0)
    out = capsys.readouterr()
    return info.value.code, json.loads(out.out), out.err.strip()


def bf16_bytes(size: str) -> int:
    return sum(math.prod(shape) for shape in tensor_shapes(llama3_config(size)).values()) * 2


def test_8b_cluster_example_fits_8x80gb_with_one_host_copy_per_node(llama8b, tmp_path, capsys):
    code, plan, err = run_plan(capsys, cluster_config(tmp_path, llama8b), "--gpu-memory", "80", "--host-memory", "1000")
    assert code == 0 and err == ""
    assert plan["fits"] and plan["placement"] == "host" and plan["machine"]["workers_per_node"] == 8
    device, host = plan["breakdown"]["per_worker"], plan["breakdown"]["per_node"]
    assert plan["per_worker"]["device_bytes"] == sum(device.values()) <= 0.95 * 80 * GiB
    assert plan["per_node"]["host_bytes"] == sum(host.values())
    # One bf16 copy of the 4 models on the host (Llama-3-8B: 8.03 B parameters each), none on the GPUs.
    assert bf16_bytes("8b") == 16_060_522_496
    assert host["shared_inputs"] == 4 * bf16_bytes("8b") and device["resident_inputs"] == 0
    # vLLM starts first with the share the plan sets. Every method of the space runs slice by slice, so the
    # merge's float32 workspace holds the merged 128256×4096 embedding, one bool tie mask per expert and
    # slices, not the base and 3 task vectors of it (and their temporaries): vLLM gets 0.85 of the GPU.
    assert plan["gpu_memory_utilization_set_by_plan"] and plan["gpu_memory_utilization"] >= 0.85
    assert device["engine"] == int(plan["gpu_memory_utilization"] * 80 * GiB)
    assert plan["inputs"]["largest_tensor"] == "model.embed_tokens.weight"
    embedding = 128256 * 4096
    assert embedding * 4 + 3 * embedding <= device["workspace"] < 2.5 * embedding * 4
    assert plan["inputs"]["engine_minimum_bytes"] <= device["engine"]
    # The order statistics TIES, breadcrumbs and DELLA read (about 4 + 4 + 2 bytes per entry and expert)
    # are one mapped copy per node, next to the inputs.
    assert host["order_statistics"] == 3 * (4 + 4 + 2) * bf16_bytes("8b") // 2


def test_8b_on_a_small_host_names_the_methods_whose_order_statistics_do_not_fit(llama8b, tmp_path, capsys):
    code, plan, err = run_plan(capsys, cluster_config(tmp_path, llama8b), "--gpu-memory", "80", "--host-memory", "256")
    assert code == 2 and not plan["fits"] and plan["placement"] == "host"
    assert len(err.splitlines()) == 1
    assert "search fewer of the methods whose order statistics it holds (breadcrumbs_ties, della, ties; 224.4 GiB)" in err
    # Without those methods the same host fits.
    code, plan, err = run_plan(
        capsys, cluster_config(tmp_path, llama8b, search={"methods": ["linear", "task_arithmetic", "dare_ties"]}), "--gpu-memory", "80", "--host-memory", "256"
    )
    assert code == 0 and plan["fits"] and plan["breakdown"]["per_node"]["order_statistics"] == 0


def test_8b_on_the_device_is_refused_naming_the_fix(llama8b, tmp_path, capsys):
    code, plan, err = run_plan(capsys, cluster_config(tmp_path, llama8b, ray={"resident": "device"}), "--gpu-memory", "80", "--host-memory", "1000")
    assert code == 2 and not plan["fits"] and plan["placement"] == "device"
    assert plan["breakdown"]["per_worker"]["resident_inputs"] == 4 * bf16_bytes("8b")
    assert len(err.splitlines()) == 1 and "set ray.resident: host" in err


def test_a_configured_vllm_share_that_leaves_too_little_is_refused_with_the_value_to_set(llama8b, tmp_path, capsys):
    config = cluster_config(tmp_path, llama8b)
    data = yaml.safe_load(config.read_text())
    data["evaluator"]["model_args"]["gpu_memory_utilization"] = 0.95
    config.write_text(yaml.safe_dump(data))
    code, plan, err = run_plan(capsys, config, "--gpu-memory", "80", "--host-memory", "1000")
    assert code == 2 and plan["gpu_memory_utilization"] == 0.95 and not plan["gpu_memory_utilization_set_by_plan"]
    suggested = float(re.search(r"gpu_memory_utilization to (0\.\d\d)", err).group(1))
    assert len(err.splitlines()) == 1 and 0.3 < suggested < 0.95
    data["evaluator"]["model_args"]["gpu_memory_utilization"] = suggested
    config.write_text(yaml.safe_dump(data))
    code, plan, _ = run_plan(capsys, config, "--gpu-memory", "80", "--host-memory", "1000")
    assert code == 0 and plan["fits"]


def test_70b_reports_what_it_needs_and_is_refused_on_one_80gb_gpu(llama70b, tmp_path, capsys):
    code, plan, err = run_plan(capsys, cluster_config(tmp_path, llama70b), "--gpu-memory", "80", "--host-memory", "1000")
    assert code == 2 and not plan["fits"]
    assert len(err.splitlines()) == 1 and "vLLM needs" in err and "each worker needs a GPU of ≥" in err
    weights = bf16_bytes("70b")
    assert weights > 140e9 and plan["inputs"]["engine_weights_bytes"] == weights
    assert plan["breakdown"]["per_worker"]["engine"] >= weights  # what vLLM needs, not a share it cannot start in
    assert plan["per_worker"]["device_bytes"] > 80 * GiB
    assert plan["breakdown"]["per_node"]["shared_inputs"] == 4 * weights  # and the host copy would fit in 1000 GiB
    assert plan["gpu_memory_utilization"] is None


def test_rank1_moments_are_counted_compressed(llama8b, tmp_path, capsys):
    config = llama3_config("8b")
    plans = {}
    for form in ("full", "rank1"):
        moments = {e: str(write_sparse_moments(tmp_path / f"{e}.{form}.safetensors", config, rank1=form == "rank1")) for e in EXPERTS}
        study = cluster_config(tmp_path, llama8b, search={"methods": ["ota"]})
        data = yaml.safe_load(study.read_text())
        data["models"]["moments"] = moments
        study.write_text(yaml.safe_dump(data))
        plans[form] = run_plan(capsys, study, "--gpu-memory", "80", "--host-memory", "1000")[1]
    shapes = tensor_shapes(config).values()
    full = 3 * sum(math.prod(s) for s in shapes) * 4
    compressed = 3 * sum((sum(s) if len(s) == 2 else math.prod(s)) for s in shapes) * 4
    assert plans["full"]["inputs"]["statistics_bytes"] == full  # 96 GB of float32 moments
    assert plans["rank1"]["inputs"]["statistics_bytes"] == compressed < full / 1000
    assert plans["rank1"]["breakdown"]["per_node"]["shared_inputs"] == 4 * bf16_bytes("8b") + compressed
    # OTA runs slice by slice: each expert's moment is expanded one slice at a time, never for a whole
    # tensor (the workspace holds the merged embedding, a tie mask per expert and slices).
    workspace = plans["rank1"]["breakdown"]["per_worker"]["workspace"]
    assert workspace < 2.5 * 128256 * 4096 * 4  # before: ≥ 7 embedding-sized float32 buffers


@pytest.fixture(scope="module")
def tiny_three(tmp_path_factory) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny3")
    paths = build_tiny_models(root)
    model = AutoModelForCausalLM.from_pretrained(paths["code"])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.99)
    model.save_pretrained(root / "art", safe_serialization=True)
    return {**paths, "art": str(root / "art")}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_the_workspace_the_plan_counts_is_what_a_resident_merge_allocates(tiny_three, method):
    from transformers import AutoModelForCausalLM

    params = {"density": 0.5} if method not in ("linear", "task_arithmetic") else {}
    recipe = Recipe.from_dict({"models": tiny_three, "base": "base", "rules": [{"method": method, "params": params}]})
    modelset = ModelSet.from_recipe(recipe)
    planned = workspace_bytes(modelset, [MethodUse(method, (tuple(params.items()),))], device="cpu")[2][method]
    live = AutoModelForCausalLM.from_pretrained(tiny_three["base"])
    resident = ResidentModelSet.load(modelset, orders=get_method(method).orders)  # as a worker loads for its study
    with PeakAllocations() as tracker:
        resident.merge_into(recipe, LiveModelSink(live), seed=0)
    assert tracker.peak <= planned <= 1.4 * tracker.peak


def test_run_refuses_a_study_that_cannot_fit_before_ray_starts(tiny_three, tmp_path, capsys, monkeypatch):
    import ray

    import mergetune.search.driver as driver

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "connect_ray", no_ray)
    monkeypatch.setattr(driver, "WorkerPool", no_ray)
    ray_was_running = ray.is_initialized()  # another test module's session may be up
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    config = {
        "study": "too-big",
        "models": {"base": tiny_three["base"], "experts": {"math": tiny_three["math"], "code": tiny_three["code"]}},
        "evaluator": {"kind": "quick", "tasks": {"t": {"search": str(task), "test": str(task), "max_new_tokens": 2}}},
        "storage": f"sqlite:///{tmp_path / 's.db'}",
        "ray": {"workers": 2, "host_memory_gb": 0.5},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert "does not fit" in err and "of host memory" in err and "usable" in err
    assert ray.is_initialized() == ray_was_running and not (tmp_path / "s.db").exists()


def test_after_the_engine_starts_the_worker_checks_the_gpu_has_room(llama8b, tmp_path, monkeypatch):
    from mergetune.search.config import load_study_config
    from mergetune.search.plan import MemoryPlanError, check_device_room

    config = load_study_config(cluster_config(tmp_path, llama8b, ray={"gpu_memory_gb": 80, "host_memory_gb": 1000}))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GiB, 80 * GiB))
    check_device_room(config, "cuda:0")  # vLLM took its planned share: the merge's ~7 GiB are free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 80 * GiB))
    with pytest.raises(MemoryPlanError, match=r"3\.0 GiB of cuda:0 is free but the merge needs \d\.\d GiB"):
        check_device_room(config, "cuda:0")


def test_plan_of_a_small_cpu_study_keeps_the_inputs_on_the_workers(tiny_three, tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    config = {
        "study": "small",
        "models": {"base": tiny_three["base"], "experts": {"math": tiny_three["math"], "code": tiny_three["code"]}},
        "evaluator": {"kind": "quick", "tasks": {"t": {"search": str(task), "test": str(task), "max_new_tokens": 2}}},
        "ray": {"workers": 2, "host_memory_gb": 16},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        main(["plan", str(path)])
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert info.value.code == 0 and "placement: device (asked: auto)" in out and out.strip().endswith("fits")
    code, plan, _ = run_plan(capsys, path)
    inputs = sum(p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little") for p in (Path(tiny_three[m]) / "model.safetensors" for m in ("base", "math", "code")))
    worker = plan["breakdown"]["per_worker"]
    assert code == 0 and worker["resident_inputs"] == inputs  # every worker its own copy: small enough
    node = plan["breakdown"]["per_node"]
    assert plan["per_node"]["host_bytes"] == 2 * plan["per_worker"]["device_bytes"] + node["order_statistics"]


@pytest.mark.parametrize(("space", "held"), [("parameter", 0), ("dataflow", 3), ("both", 4)])
def test_a_dataflow_study_counts_the_decoder_layers_its_workers_hold(llama8b, tmp_path, capsys, space, held):
    hf = {"kind": "lm_eval", "backend": "hf", "tasks": ["arc_easy"]}
    config = cluster_config(tmp_path, llama8b, evaluator=hf, search={"space": space, "methods": ["linear"]}, ray={"resident": "host"})
    data = yaml.safe_load(config.read_text())
    data["evaluator"] = hf  # replaced, not merged: the cluster config's vLLM settings do not apply
    config.write_text(yaml.safe_dump(data))
    _, plan, _ = run_plan(capsys, config, "--gpu-memory", "80", "--host-memory", "1000")
    layers = sum(math.prod(shape) for name, shape in tensor_shapes(llama3_config("8b")).items() if ".layers." in name) * 2
    assert layers == 13_959_168_000  # Llama-3-8B's 32 decoder layers in bf16: 13.0 GiB
    worker = plan["breakdown"]["per_worker"]
    assert worker["dataflow_layers"] == held * layers
    assert plan["fits"]  # 20.6 / 59.6 / 72.6 GiB of an 80 GB GPU with host-placed inputs
    assert plan["per_worker"]["device_bytes"] == sum(worker.values())
