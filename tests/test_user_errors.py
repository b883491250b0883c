"""Every user error at the edge: one plain line on stderr, exit 2, nothing written — before Ray or any tensor.

Issue 14's list of inputs that used to run into silent garbage, late Ray tracebacks or tracebacks.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_studies_fixtures import EXPERTS, build_tiny_models, make_study

from architectures import tiny_structure

from mergetune.cli.main import main
from mergetune.core.errors import ConfigError
from mergetune.search.config import parse_study_config

torch.set_num_threads(1)


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one error line, the last on stderr (returned).

    Progress output of the work done before the error (transformers' "Loading weights" bar) may precede it."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2, err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture
def no_ray(monkeypatch):
    """Ray must not start: these errors are the driver's, before any worker."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("errors_zoo"))


# --- the study config: `mergetune run` refuses before Ray starts and writes nothing ---
STUDY = {
    "study": "s",
    "models": {"base": "/nowhere/base", "experts": {"x": "/nowhere/x", "y": "/nowhere/y"}},
    "evaluator": {"kind": "quick", "zoo": "/nowhere/zoo"},
}


def _with(**changes: object) -> dict:
    data = json.loads(json.dumps(STUDY))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # typos that did nothing
        (_with(search__ranges={"lamda": [0.2, 1.0]}), "search.ranges: 'lamda' is not a searched parameter; ranges may name weight, alpha, density"),
        (_with(search__shared=["bogus"]), "search.shared: 'bogus' is not a searched parameter; shared may name weight, alpha, density"),
        (_with(search__per_expert=["bogus"]), "search.per_expert: 'bogus' is not a searched parameter; per_expert may name density"),
        # ranges outside the parameter's domain
        (_with(search__ranges={"density": [-0.5, -0.1]}), "search.ranges.density: [-0.5, -0.1] must lie in (0, 1]"),
        (_with(search__ranges={"density": [0.5, 1.5]}), "search.ranges.density: [0.5, 1.5] must lie in (0, 1]"),
        (_with(search__ranges={"lambda": [0, math.inf]}), "search.ranges.lambda.1: Input should be a finite number"),
        (_with(search__ranges={"weight": [0, 0]}), "search.ranges.weight: [0, 0] makes every weight 0"),
        (_with(search__ranges={"lambda": [0, 0]}), "search.ranges.lambda: [0, 0] makes every lambda 0"),
        # evaluator typos: at the driver, not a RayActorError from the worker
        (_with(evaluator__limt=5), "evaluator.limt: unknown key; allowed here: limit, seed, batch_size"),
        (_with(evaluator__kind="quik"), "evaluator: kind: 'quik' is not an evaluator; use one of quick, lm_eval"),
        (_with(evaluator={"kind": "lm_eval", "tasks": ["t"], "limt": 5}), "evaluator.limt: unknown key; allowed here: limit"),
        # vLLM data/tensor parallelism (issue 12): refused with the alternative
        (
            _with(evaluator={"kind": "lm_eval", "backend": "vllm", "tasks": ["t"], "model_args": {"data_parallel_size": 2}}),
            "evaluator: model_args.data_parallel_size: 2 is not supported with backend: vllm; each data-parallel replica",
        ),
        (
            _with(evaluator={"kind": "lm_eval", "backend": "vllm", "tasks": ["t"], "model_args": {"tensor_parallel_size": 2}}),
            "evaluator: model_args.tensor_parallel_size: 2 is not supported with backend: vllm; the weight push serves one worker",
        ),
        # seeds numpy cannot take
        (_with(seed=2**70), "seed: Input should be less than or equal to 4294967295"),
        (_with(seed=-1), "seed: Input should be greater than or equal to 0"),
        ({**STUDY, "zoo": 5}, "zoo: give the path of a zoo directory, not 5"),
        (_with(ray__device="gpu"), "ray.device: 'gpu' is not a device the workers can use; give cpu or cuda (cuda:N)"),
    ],
)
def test_a_bad_study_config_is_one_line_before_ray_and_writes_nothing(data, message, tmp_path, monkeypatch, capsys, no_ray):
    monkeypatch.chdir(tmp_path)
    Path("study.yaml").write_text(yaml.safe_dump(data))
    err = cli_error(["run", "study.yaml"], capsys)
    assert f"study.yaml: {message}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no studies/ storage


def test_the_messages_keep_their_brackets(tmp_path, monkeypatch, capsys):
    """Errors are plain text: `[low, high]` and a path's `[red]` are not read as rich markup."""
    monkeypatch.chdir(tmp_path)
    Path("study.yaml").write_text(yaml.safe_dump(_with(search__ranges={"lambda": [1.0, 0.5]})))
    assert "search.ranges.lambda: range must be [low, high] with low <= high" in cli_error(["run", "study.yaml"], capsys)
    odd = tmp_path / "a[red]b" / "recipe.yaml"
    assert f"{odd}: file not found" in cli_error(["merge", str(odd), "--out", str(tmp_path / "o")], capsys)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys, no_ray):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("study: caf\u00e9\n".encode("latin-1"))
    assert "latin1.yaml: not UTF-8 text (byte 10 is 0xe9); save it as UTF-8" in cli_error(["run", str(bad)], capsys)


def test_cuda_without_cuda_is_one_line_at_the_driver(monkeypatch, no_ray):
    from mergetune.search.driver import run_study

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = parse_study_config(_with(ray__device="cuda"), "study.yaml")
    with pytest.raises(ConfigError, match=r"^ray\.device: cuda asked for, but torch sees no CUDA device on this machine; use `ray\.device: cpu`"):
        run_study(config)
    # On a cluster the GPUs are on other nodes: the driver's own machine is not asked.
    from mergetune.search.workers import check_worker_device

    check_worker_device(parse_study_config(_with(ray__device="cuda", ray__address="auto"), "study.yaml"))


def test_a_vllm_study_without_a_supported_vllm_is_one_line_at_the_driver(monkeypatch, no_ray):
    import mergetune.evaluators.vllm as vllm_backend
    from mergetune.search.driver import run_study

    vllm_study = _with(evaluator={"kind": "lm_eval", "backend": "vllm", "tasks": ["t"]})
    for installed, message in ((None, r"vllm needs vLLM, which is not installed"), ("0.9.2", r"vllm supports vLLM >=0\.16,<0\.34, but vLLM 0\.9\.2 is installed")):
        monkeypatch.setattr(vllm_backend, "installed_vllm_version", lambda installed=installed: installed)
        with pytest.raises(ConfigError, match=rf"^evaluator\.backend: {message}"):
            run_study(parse_study_config(vllm_study, "study.yaml"))


def test_a_per_expert_param_that_no_method_takes_per_expert_is_refused(tmp_path):
    from mergetune.search.space import SearchSpace

    with pytest.raises(ConfigError, match=r"search\.per_expert: 'lambda' is not a searched parameter; per_expert may name density, epsilon, gamma$"):
        parse_study_config(_with(search__per_expert=["lambda"]), "study.yaml")
    moments = {"x": "/m/x", "y": "/m/y"}
    data = _with(search__methods=["ota"], search__ranges={"weight": [-1.0, 1.0]})
    data["models"]["moments"] = moments
    with pytest.raises(ConfigError, match=r"search\.ranges\.weight: \[-1, 1\] must lie in \[0, inf\) for 'ota'"):
        SearchSpace(parse_study_config(data, "study.yaml"), structure=tiny_structure(num_layers=2))


def test_warm_start_baselines_are_the_classics_or_skipped_never_clipped_towards_the_base(caplog):
    from mergetune.search.space import SearchSpace
    from mergetune.search.warmstart import baseline_params

    methods = ["linear", "task_arithmetic", "ties", "dare_ties"]
    space = SearchSpace(parse_study_config(_with(search__methods=methods, search__ranges={"density": [0.01, 0.02]}), "t"), structure=tiny_structure(num_layers=2))
    with caplog.at_level("WARNING"):
        names = [name for name, _ in baseline_params(space)]
    # ties/dare_ties at density 0.02 would be the base model plus 2% of the experts, labelled "ties".
    assert names == ["uniform_average", "task_arithmetic", "task_arithmetic_tuned"]
    assert "baseline ties skipped: density 0.5 lies outside search.ranges.density [0.01, 0.02]" in caplog.text
    space = SearchSpace(parse_study_config(_with(search__methods=methods), "t"), structure=tiny_structure(num_layers=2))
    baselines = dict(baseline_params(space))
    recipe = space.recipe(optuna.trial.FixedTrial(baselines["dare_ties"]))
    assert all(rule.params == {"density": {"x": 0.5, "y": 0.5}, "lambda": 1.0} for rule in recipe.rules)
    assert all(rule.weights == {"x": 1.0, "y": 1.0} for rule in recipe.rules)


# --- recipes: refused before any tensor is read; a non-finite merge stops and writes nothing ---
@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"method": "linear", "weights": {"math": 0.0, "code": 0.0}}, "rules.0.weights: every expert's weight is 0, so 'linear' would write an all-zero model; give at least one expert a non-zero weight"),
        ({"method": "ties", "weights": {"math": 0.0, "code": 0.0}}, "rules.0.weights: every expert's weight is 0, so 'ties' would return the base model unchanged"),
        ({"method": "linear", "weights": {"math": math.nan}}, "rules.0.weights.math: Input should be a finite number"),
        ({"method": "linear", "weights": {"math": math.inf}}, "rules.0.weights.math: Input should be a finite number"),
        ({"method": "ties", "params": {"density": -0.5}}, "rules.0.params.density: -0.5 is outside (0, 1]"),
        ({"method": "dare_ties", "params": {"density": -0.5}}, "rules.0.params.density: -0.5 is outside (0, 1]"),
        ({"method": "ties", "params": {"density": 1.5}}, "rules.0.params.density: 1.5 is outside (0, 1]"),
        ({"method": "dare_ties", "params": {"density": {"math": 0.5, "code": math.nan}}}, "rules.0.params.density: nan is not a finite number"),
        ({"method": "ties", "params": {"density": math.nan}}, "rules.0.params.density: nan is not a finite number"),
        ({"method": "ota", "params": {"power": 0}}, "rules.0.params.power: 0 is outside (0, inf)"),
        ({"method": "ties", "params": {"scope": "glob"}}, "rules.0.params.scope: 'glob' is not one of tensor, global"),
    ],
)
def test_a_nonsense_recipe_is_one_line_and_writes_nothing(rule, message, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": {"base": "/b", "math": "/m", "code": "/c"}, "base": "base", "rules": [rule]}))
    assert f"recipe.yaml: {message}" in cli_error(["merge", str(recipe), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_an_expert_with_nan_tensors_stops_the_merge_naming_the_tensor(models, tmp_path, capsys):
    broken = tmp_path / "code"
    state = load_file(Path(models["code"]) / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = math.nan
    broken.mkdir()
    for f in Path(models["code"]).iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "recipe.yaml"
    paths = {**models, "code": str(broken)}
    recipe.write_text(yaml.safe_dump({"models": paths, "base": "base", "rules": [{"method": "ties", "params": {"density": 0.5}}]}))
    err = cli_error(["merge", str(recipe), "--out", str(tmp_path / "out")], capsys)
    assert "merged tensor 'model.layers.1.mlp.up_proj.weight' (rules.0, ties) has NaN/inf values: expert 'code' has NaN/inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "recipe.yaml"]


# --- report: atomic, --force over an existing one, a full disk is one line ---
@pytest.fixture
def study_url(tmp_path) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/s.db"
    make_study(url, {"base": "/models/base", **{e: f"/models/{e}" for e in EXPERTS}})
    return url


def test_report_needs_force_over_an_existing_report(study_url, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.html").write_text("an older report")
    argv = ["report", "--study", "synthetic", "--storage", study_url, "--out", str(out)]
    assert "exists and is not empty; pass --force" in cli_error(argv, capsys)
    assert (out / "report.html").read_text() == "an older report"
    with pytest.raises(SystemExit) as done:
        main([*argv, "--force"])
    assert done.value.code == 0 and "Plotly.newPlot" in (out / "report.html").read_text()


@pytest.mark.parametrize("existing", [False, True])
def test_report_on_a_full_disk_is_one_line_and_keeps_what_was_there(study_url, tmp_path, monkeypatch, capsys, existing):
    import matplotlib.figure

    out = tmp_path / "r"
    if existing:
        out.mkdir()
        (out / "report.html").write_text("an older report")
    def full(self, fname, *args, **kwargs):  # the PNG is half written when the disk fills up
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    err = cli_error(["report", "--study", "synthetic", "--storage", study_url, "--out", str(out), "--force"], capsys)
    assert f"disk full while writing {out}; nothing was written" in err
    if existing:
        assert [p.name for p in out.iterdir()] == ["report.html"] and (out / "report.html").read_text() == "an older report"
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["r", "s.db"] if existing else ["s.db"])


# --- stats: safetensors only; a full disk is one line ---
@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    data.write_text(json.dumps({"prompt": "rev abc=", "answer": "cba"}) + "\n")
    return data


def test_stats_refuses_a_pickled_model(models, calibration, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in Path(models["math"]).iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(Path(models["math"]) / "model.safetensors"), pickled / "pytorch_model.bin")
    out = tmp_path / "F.safetensors"
    err = cli_error(["stats", "fisher", str(pickled), "--data", str(calibration), "--out", str(out)], capsys)
    assert "mergetune reads safetensors only" in err and not out.exists()


def test_stats_on_a_full_disk_is_one_line_and_leaves_nothing(models, calibration, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "stats" / "G.safetensors"
    err = cli_error(["stats", "gram", models["math"], "--data", str(calibration), "--out", str(out)], capsys)
    assert f"disk full while writing {out}; nothing was written" in err
    assert list(out.parent.iterdir()) == []


def test_data_files_that_are_not_utf8_are_one_line_errors(tmp_path):
    from mergetune.evaluators.base import build_evaluator
    from mergetune.merge.stats import read_calibration

    latin1 = tmp_path / "t.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "answer": "x"}\n'.encode("latin-1"))
    spelled = {"t": {"search": str(latin1), "test": str(latin1), "max_new_tokens": 2}}
    with pytest.raises(ConfigError, match=r"t\.jsonl is not UTF-8 text; save it as UTF-8$"):
        build_evaluator({"kind": "quick", "tasks": spelled})
    with pytest.raises(ConfigError, match=r"t\.jsonl is not UTF-8 text; save it as UTF-8$"):
        read_calibration(latin1)
