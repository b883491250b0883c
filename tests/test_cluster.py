"""A study on a real two-node Ray cluster (head + a second node joined by address, on loopback).

The driver runs in a subprocess that joins the cluster through `ray.address`, as `mergetune run`
does on a real cluster, so this module never shares a Ray session with the other test modules.
One CPU per node and two 1-CPU workers force one actor per node; the stand-in workers of
test_driver keep the trials cheap.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from servers import start_ray_cluster
from test_driver import states, study_config

from mergetune.studies.store import open_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths must stay short: a temp dir of its own under /tmp, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="mt-ray-", dir="/tmp"))
    started = start_ray_cluster(root, head_cpus=1, worker_cpus=1, worker_resource="node2")
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_driver(tmp_path: Path, config, env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Run the study in a subprocess joined to the cluster; returns {node id: resources} of the cluster."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, ray
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_driver
        from mergetune.search.config import parse_study_config
        from mergetune.search.driver import run_study
        from rich.console import Console
        ray.cloudpickle.register_pickle_by_value(test_driver)
        class SlowWorker(test_driver.FakeWorker):
            delay = 0.3
        config = parse_study_config({config.model_dump(mode="json")!r}, "test")
        run_study(config, worker_cls=SlowWorker, console=Console(quiet=True))
        assert not ray.is_initialized()  # run_study joined the cluster itself and left it
        ray.init(address=config.ray.address, log_to_driver=False)
        print(json.dumps({{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~20 s to start the cluster, ~20 s of study
def test_study_on_two_nodes_uses_both_and_reaches_its_budget(cluster, tmp_path):
    config = study_config(tmp_path, "cluster", 10, ray={"workers": 2, "cpus_per_worker": 1, "address": cluster.address})
    nodes = run_driver(tmp_path, config, cluster.env)
    assert len(nodes) == 2
    second = next(node for node, resources in nodes.items() if "node2" in resources)

    study = open_study("cluster", config.storage_url)
    assert states(study) == {TrialState.COMPLETE: 10}
    served = [t.user_attrs["node_id"] for t in study.get_trials()]
    assert set(served) == set(nodes)  # both nodes ran trials, and no other node did
    assert 0 < served.count(second) < len(served)
