"""The miniature zoo: task splits, files and manifest, Adam moments, lm-eval offline, determinism, CLI errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mergetune.zoo.presets import PRESETS
from mergetune.zoo.tasks import SPLITS, TASKS, task_splits

TINY = PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergetune.zoo.build import build_zoo

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, "tiny", seed=0)
    return out


def _digests(zoo: Path) -> dict[str, str]:
    files = sorted(p for p in zoo.rglob("*.safetensors"))
    return {str(p.relative_to(zoo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_disjoint_sized_and_seeded(name):
    sizes = {"train": 300, "search": 40, "test": 50}
    splits = task_splits(TASKS[name], sizes, seed=3)
    prompts = {split: {r["prompt"] for r in splits[split]} for split in SPLITS}
    assert {split: len(prompts[split]) for split in SPLITS} == sizes
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["search"]
    assert not prompts["search"] & prompts["test"]
    assert all(r["prompt"].startswith(f"{name} ") and r["prompt"].endswith("=") for r in splits["test"])
    assert splits == task_splits(TASKS[name], sizes, seed=3)
    assert splits["test"] != task_splits(TASKS[name], sizes, seed=4)["test"]
    # The held-out splits do not move when the train split grows.
    assert splits["test"] == task_splits(TASKS[name], {**sizes, "train": 600}, seed=3)["test"]


def test_task_answers_are_right():
    for record in task_splits(TASKS["skip"], {"train": 0, "search": 0, "test": 20}, 0)["test"]:
        assert record["answer"] == record["prompt"].removeprefix("skip ").removesuffix("=")[::2]
    for record in task_splits(TASKS["sort"], {"train": 0, "search": 0, "test": 20}, 0)["test"]:
        assert record["answer"] == "".join(sorted(record["prompt"].removeprefix("sort ").removesuffix("=")))
    for record in task_splits(TASKS["reverse"], {"train": 0, "search": 0, "test": 20}, 0)["test"]:
        assert record["answer"] == record["prompt"].removeprefix("reverse ").removesuffix("=")[::-1]
    for record in task_splits(TASKS["dedup"], {"train": 0, "search": 0, "test": 20}, 0)["test"]:
        word = record["prompt"].removeprefix("dedup ").removesuffix("=")
        assert len(set(record["answer"])) == len(record["answer"]) and set(record["answer"]) == set(word)
        assert [word.index(c) for c in record["answer"]] == sorted(word.index(c) for c in record["answer"])


def test_pretraining_mix_has_each_task_on_short_words_only():
    from mergetune.zoo.build import pretraining_mix

    sizes = dict(TINY.split_sizes)
    splits = {task: task_splits(TASKS[task], sizes, seed=0) for task in TINY.tasks}
    mix = pretraining_mix(TINY, splits, seed=0)
    assert mix == pretraining_mix(TINY, splits, seed=0) and mix != pretraining_mix(TINY, splits, seed=1)
    held_out = {r["prompt"] for t in TINY.tasks for split in ("search", "test") for r in splits[t][split]}
    assert not held_out & {r["prompt"] for r in mix}
    by_task: dict[str, list[str]] = {}
    for record in mix:
        name, word = record["prompt"].removesuffix("=").split(" ")
        assert record["answer"] == TASKS[name].solve(word)
        by_task.setdefault(name, []).append(word)
    assert {name: len(words) for name, words in by_task.items()} == {t: sizes["train"] for t in TINY.tasks}
    for name in TINY.tasks:
        lengths = {len(word) for word in by_task[name]}
        # Short words only: the splits' longer words (the most of them) are never seen with the task's rule.
        assert min(lengths) == 2 and max(lengths) == TASKS[name].pretrain_max_letters < TASKS[name].lengths[1]


def test_sft_mix_is_the_train_split_plus_a_replay_share_of_the_pretraining_mix():
    from mergetune.zoo.build import pretraining_mix, sft_mix

    sizes = dict(TINY.split_sizes)
    splits = {task: task_splits(TASKS[task], sizes, seed=0) for task in TINY.tasks}
    mix = pretraining_mix(TINY, splits, seed=0)
    records = sft_mix(TINY, splits, mix, "sort", seed=0)
    own, replayed = records[: sizes["train"]], records[sizes["train"] :]
    assert own == splits["sort"]["train"]
    assert len(replayed) / len(records) == pytest.approx(TINY.sft_replay)
    assert all(r in mix for r in replayed) and {r["prompt"].split(" ")[0] for r in replayed} == set(TINY.tasks)
    assert replayed != sft_mix(TINY, splits, mix, "dedup", seed=0)[sizes["train"] :]


def test_acceptance_says_what_a_zoo_misses():
    from mergetune.zoo.build import acceptance, acceptance_shortfall

    base = {"a": 0.5, "b": 0.2, "c": 0.1}
    experts = {"a": {"a": 0.6, "b": 0.0, "c": 0.0}, "b": {"a": 0.0, "b": 0.9, "c": 0.0}, "c": {"a": 0.0, "b": 0.0, "c": 0.8}}
    figures = acceptance(base, experts, average={"a": 0.55, "b": 0.85, "c": 0.3})
    assert figures["expert_gain"] == pytest.approx({"a": 0.1, "b": 0.7, "c": 0.7})
    assert figures["average_drop"] == pytest.approx({"a": 0.05, "b": 0.05, "c": 0.5})
    assert not figures["passed"]
    assert acceptance_shortfall(figures) == (
        "expert a gains +10.0 points on its task (needs ≥ 15); "
        "the uniform average is ≥ 10 points below the expert on 1 task(s) (needs 2)"
    )
    passing = acceptance(base, experts, average={"a": 0.0, "b": 0.1, "c": 0.1})
    assert not passing["passed"]  # expert a still gains too little
    experts["a"]["a"] = 0.65
    passing = acceptance(base, experts, average={"a": 0.0, "b": 0.1, "c": 0.1})
    assert passing["passed"] and acceptance_shortfall(passing) == ""


def test_tokenizer_round_trip_from_the_saved_base(tiny_zoo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    text = "reverse abc=cba"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    assert tokenizer.padding_side == "left"


def test_manifest_describes_the_files(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0 and manifest["base"] == "base"
    assert manifest["experts"] == {t: f"experts/{t}" for t in TINY.tasks}
    assert set(manifest["tasks"]) == set(TINY.tasks)
    sizes = dict(TINY.split_sizes)
    for task, entry in manifest["tasks"].items():
        assert entry["lm_eval"] == {"test": f"zoo_{task}", "search": f"zoo_{task}_search", "include_path": "tasks"}
        assert entry["max_new_tokens"] == TASKS[task].max_new_tokens
        for split in SPLITS:
            lines = (tiny_zoo / entry["splits"][split]).read_text().splitlines()
            assert len(lines) == sizes[split]
            assert set(json.loads(lines[0])) == {"prompt", "answer"}
        for name in (f"zoo_{task}", f"zoo_{task}_search"):
            assert (tiny_zoo / "tasks" / task / f"{name}.yaml").is_file()
    for path in [manifest["base"], *manifest["experts"].values()]:
        config = json.loads((tiny_zoo / path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
        assert config["hidden_size"] == TINY.hidden_size and config["num_hidden_layers"] == TINY.num_layers
        assert (tiny_zoo / path / "model.safetensors").is_file()
    accuracy = manifest["accuracy"]
    assert accuracy["split"] == "test"
    assert set(accuracy["experts"]) == set(TINY.tasks)
    for row in [accuracy["base"], accuracy["uniform_average"], *accuracy["experts"].values()]:
        assert set(row) == set(TINY.tasks) and all(0.0 <= v <= 1.0 for v in row.values())
    assert isinstance(accuracy["acceptance"]["passed"], bool)
    assert manifest["training"]["pretrain"]["steps"] == TINY.pretrain.steps
    assert manifest["build_seconds"] > 0


def test_second_moments_are_keyed_like_named_parameters(tiny_zoo):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for task in TINY.tasks:
        expert_dir = tiny_zoo / "experts" / task
        model = AutoModelForCausalLM.from_pretrained(expert_dir)
        params = {name: tuple(p.shape) for name, p in model.named_parameters()}
        with safe_open(str(expert_dir / "adam_second_moments.safetensors"), "pt") as moments:
            assert {name: tuple(moments.get_slice(name).get_shape()) for name in moments.keys()} == params
            metadata = moments.metadata()
            assert int(metadata["step"]) == TINY.sft.steps
            assert (float(metadata["beta1"]), float(metadata["beta2"])) == TINY.sft.betas
            assert float(metadata["lr"]) == TINY.sft.lr
            second = moments.get_tensor("model.layers.0.mlp.down_proj.weight")
            assert (second >= 0).all() and second.sum() > 0


def test_experts_differ_from_the_base(tiny_zoo):
    from safetensors.torch import load_file

    base = load_file(tiny_zoo / "base" / "model.safetensors")
    expert = load_file(tiny_zoo / "experts" / TINY.tasks[0] / "model.safetensors")
    assert base.keys() == expert.keys()
    assert any(not torch.equal(base[k], expert[k]) for k in base)


def test_lm_eval_scores_a_zoo_task_offline(tiny_zoo, monkeypatch):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    task = TINY.tasks[0]
    lm_eval_names = manifest["tasks"][task]["lm_eval"]
    manager = TaskManager(include_path=str(tiny_zoo / lm_eval_names["include_path"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "experts" / task)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_zoo / "experts" / task), batch_size=4)
    results = evaluator.simple_evaluate(
        model=lm, tasks=[lm_eval_names["test"], lm_eval_names["search"]], limit=3, task_manager=manager
    )
    for name in (lm_eval_names["test"], lm_eval_names["search"]):
        score = results["results"][name]["exact_match,none"]
        assert 0.0 <= score <= 1.0


def test_lm_eval_agrees_with_our_greedy_exact_match(tiny_zoo):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.evaluators.generation import greedy_generate

    task = TINY.tasks[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    records = [json.loads(line) for line in (tiny_zoo / "tasks" / task / "test.jsonl").read_text().splitlines()][:4]
    ours = greedy_generate(model, tokenizer, [r["prompt"] for r in records], TASKS[task].max_new_tokens)
    results = evaluator.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=[f"zoo_{task}"],
        limit=4,
        task_manager=TaskManager(include_path=str(tiny_zoo / "tasks")),
        log_samples=True,
    )
    theirs = [s["resps"][0][0] for s in sorted(results["samples"][f"zoo_{task}"], key=lambda s: s["doc_id"])]
    assert [t.split("\n")[0].strip() for t in theirs] == [o.strip() for o in ours]


def test_tiny_build_is_deterministic(tiny_zoo, tmp_path):
    from mergetune.zoo.build import build_zoo

    torch.set_num_threads(1)
    build_zoo(tmp_path / "again", "tiny", seed=0)
    assert _digests(tmp_path / "again") == _digests(tiny_zoo)
    for task in TINY.tasks:
        for split in SPLITS:
            path = Path("tasks") / task / f"{split}.jsonl"
            assert (tmp_path / "again" / path).read_bytes() == (tiny_zoo / path).read_bytes()


def test_another_seed_gives_other_weights(tiny_zoo, tmp_path):
    from mergetune.zoo.build import build_zoo

    torch.set_num_threads(1)
    build_zoo(tmp_path / "seed1", "tiny", seed=1)
    assert _digests(tmp_path / "seed1")["base/model.safetensors"] != _digests(tiny_zoo)["base/model.safetensors"]


def _cli_error(argv: list[str], capsys) -> str:
    from mergetune.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress bars may precede it; the error itself is one line.
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and err.rstrip().endswith(error_lines[0])
    return error_lines[0]


def test_cli_refuses_a_non_empty_output_without_force(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    err = _cli_error(["zoo", "build", str(tmp_path), "--preset", "tiny"], capsys)
    assert "--force" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_refuses_an_unknown_preset(tmp_path, capsys):
    err = _cli_error(["zoo", "build", str(tmp_path / "z"), "--preset", "huge"], capsys)
    assert "huge" in err and "tiny" in err and "demo" in err
    assert not (tmp_path / "z").exists()


def test_cli_builds_and_replaces_with_force(tmp_path):
    from mergetune.cli.main import main

    out = tmp_path / "zoo"
    out.mkdir()
    (out / "old.txt").write_text("old")
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", "build", str(out), "--preset", "tiny", "--seed", "2", "--force"])
    assert exit_info.value.code == 0
    assert not (out / "old.txt").exists()
    assert json.loads((out / "zoo.json").read_text())["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".zoo.")]


def test_a_zoo_that_misses_a_required_acceptance_fails_unless_allowed(tmp_path, capsys, monkeypatch):
    import dataclasses

    from mergetune.cli.main import main
    from mergetune.zoo import presets

    # The tiny preset learns nothing, so requiring the demo acceptance of it must fail.
    monkeypatch.setattr(presets, "PRESETS", {**presets.PRESETS, "tiny": dataclasses.replace(TINY, requires_acceptance=True)})
    torch.set_num_threads(1)
    err = _cli_error(["zoo", "build", str(tmp_path / "weak"), "--preset", "tiny"], capsys)
    assert "misses its acceptance" in err and "points on its task (needs ≥ 15)" in err and "--allow-weak" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", "build", str(tmp_path / "weak"), "--preset", "tiny", "--allow-weak"])
    assert exit_info.value.code == 0
    figures = json.loads((tmp_path / "weak" / "zoo.json").read_text())["accuracy"]["acceptance"]
    assert figures["required"] is True and figures["passed"] is False


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    from transformers import LlamaForCausalLM

    def disk_full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
    torch.set_num_threads(1)
    err = _cli_error(["zoo", "build", str(tmp_path / "z"), "--preset", "tiny"], capsys)
    assert "disk full" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_demo_preset_meets_the_acceptance(tmp_path, seed):
    """Issues 2 and 19: experts gain ≥ 15 points on their task, the uniform average interferes on ≥ 2 tasks, for any seed.

    By construction: the base scores nothing on words two or more letters longer than it was
    pretrained on, and each expert learns its task's long words.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.evaluators.generation import exact_match, greedy_generate
    from mergetune.zoo.build import build_zoo

    torch.set_num_threads(1)
    out = tmp_path / "demo"
    manifest = build_zoo(out, "demo", seed=seed)  # raises WeakZooError when the acceptance is missed
    acceptance = manifest["accuracy"]["acceptance"]
    assert all(gain >= 0.15 for gain in acceptance["expert_gain"].values()), acceptance
    assert sum(drop >= 0.10 for drop in acceptance["average_drop"].values()) >= 2, acceptance
    assert acceptance["passed"] and acceptance["required"]

    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    for task in PRESETS["demo"].tasks:
        records = [json.loads(line) for line in (out / "tasks" / task / "test.jsonl").read_text().splitlines()]
        letters = [len(r["prompt"]) - len(task) - 2 for r in records]
        longer = [r for r, n in zip(records, letters) if n > TASKS[task].pretrain_max_letters]
        much_longer = [r for r, n in zip(records, letters) if n > TASKS[task].pretrain_max_letters + 1]
        scores = {}
        for name in ("base", f"experts/{task}"):
            model = AutoModelForCausalLM.from_pretrained(out / name)
            for label, items in (("longer", longer), ("much_longer", much_longer)):
                predictions = greedy_generate(model, tokenizer, [r["prompt"] for r in items], TASKS[task].max_new_tokens)
                scores[name, label] = exact_match(predictions, [r["answer"] for r in items])
        assert scores["base", "much_longer"] <= 0.05, (task, scores)
        assert scores[f"experts/{task}", "longer"] >= scores["base", "longer"] + 0.3, (task, scores)
