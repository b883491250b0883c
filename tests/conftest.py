"""Shared test setup: everything offline, small thread counts (2-core machines)."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Aligned vocabularies (merge/vocabulary.py) are cached here, not in the user's ~/.cache; Ray workers inherit it.
if "MERGETUNE_CACHE" not in os.environ:
    os.environ["MERGETUNE_CACHE"] = tempfile.mkdtemp(prefix="mergetune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MERGETUNE_CACHE"], True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Workers' order statistics (merge/summary_files.py) go to a cache of this test session, not the user's.
if "MERGETUNE_CACHE_DIR" not in os.environ:
    os.environ["MERGETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mergetune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MERGETUNE_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray (2 CPUs, 2 logical GPUs) for one test module, unless one runs already; yields its GCS address."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def vllm_engine_core():
    """The fake vLLM engine-core process (tests/fake_vllm.py), shared by the session: it imports vLLM's serializer once."""
    from fake_vllm import EngineCore

    core = EngineCore()
    yield core
    core.close()
