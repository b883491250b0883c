"""A fake vLLM engine that holds our code to the real engine's constraints, for tests without a GPU.

What is real and what is faked:
- The engine core is another process (vLLM's V1 default). Every `collective_rpc` goes through
  vLLM's own `MsgpackEncoder` (vLLM 0.33.0's code, tests/real_vllm.py) exactly as
  `LLM.collective_rpc` → `call_utility("collective_rpc", method, timeout, args, kwargs)` sends
  it, with VLLM_ALLOW_INSECURE_SERIALIZATION unset: callables and other non-msgpack objects are
  refused there, as in vLLM. On top of that the fake holds the push to its design: no tensor in a
  control message (vLLM would ship it out of band) and at most CONTROL_MESSAGE_BYTES per message.
  Replies go back through vLLM's `UtilityResult` encoding, so they must be plain data too.
- The worker is a stand-in for vLLM's GPU worker (the attributes our extension reads) into which
  the extension is mixed the way vLLM's `WorkerWrapperBase.init_worker` does it, with its
  name-clash check; methods are called by name on it.
- The model stands for a vLLM model: parameters under checkpoint names in the engine's dtype, a
  `load_weights(iterable of (name, tensor))` that copies into the existing storage, refusing unknown
  names and wrong shapes. vLLM's layerwise reload is emulated at its strictest: between
  initialize and finalize every loaded tensor is kept *by reference* until finalize (vLLM keeps a
  layer's tensors until the layer is complete), and a second load of a name is ignored.
- The prefix cache is keyed by prompt, as vLLM's block hashes ignore the weights: an answer
  cached before a push is served after it unless `reset_prefix_cache()` succeeded, and the reset
  can be made to refuse (return False), as vLLM's does while blocks are in use.
"""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing
import sys
import traceback
from types import SimpleNamespace
from typing import Any

import torch

from mergetune.evaluators.config import VLLM_WORKER_EXTENSION as WORKER_EXTENSION

CONTROL_MESSAGE_BYTES = 1 << 20


class FakeWorkerBase:
    """Stands for vLLM's WorkerBase/GPU Worker: device, rank, configs, `get_model`, `apply_model`."""

    def __init__(self, model: FakeVllmModel, dtype: torch.dtype) -> None:
        self.device = torch.device("cpu")
        self.rank = 0
        self.parallel_config = SimpleNamespace(world_size=1)
        self.model_config = SimpleNamespace(dtype=dtype, quantization=None)
        self.model = model

    def get_model(self) -> FakeVllmModel:
        return self.model

    def apply_model(self, func: Any) -> Any:
        return func(self.get_model())


class FakeGPUWorker(FakeWorkerBase):
    pass


def inject_extension(worker_class: type, qualname: str) -> None:
    """What vLLM's WorkerWrapperBase.init_worker does with `worker_extension_cls`."""
    module, _, name = qualname.rpartition(".")
    extension = getattr(importlib.import_module(module), name)
    if extension in worker_class.__bases__:
        return
    for attr in dir(extension):
        if attr.startswith("__"):
            continue
        assert not hasattr(worker_class, attr), f"Worker class {worker_class} already has an attribute {attr}"
    worker_class.__bases__ = worker_class.__bases__ + (extension,)


class FakeVllmModel(torch.nn.Module):
    def __init__(self, layout: dict[str, list[int]], dtype: torch.dtype) -> None:
        super().__init__()
        self.by_name: dict[str, torch.nn.Parameter] = {}
        for i, (name, shape) in enumerate(layout.items()):
            param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            self.register_parameter(f"p{i}", param)
            self.by_name[name] = param
        self.reloading: dict[str, torch.Tensor] | None = None
        self.version = 0

    def load_weights(self, weights: Any) -> set[str]:
        loaded = set()
        for name, tensor in weights:
            param = self.by_name.get(name)
            if param is None:
                raise ValueError(f"There is no module or parameter named {name!r} in the model")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{name}: loaded weight of shape {list(tensor.shape)} into parameter {list(param.shape)}")
            if self.reloading is not None:
                self.reloading.setdefault(name, tensor)
            else:
                param.data.copy_(tensor)
                self.version += 1
            loaded.add(name)
        return loaded


def fake_initialize_layerwise_reload(model: FakeVllmModel) -> None:
    model.reloading = {}


def fake_finalize_layerwise_reload(model: FakeVllmModel, model_config: Any) -> None:
    assert model.reloading is not None, "finalize without initialize"
    for name, tensor in model.reloading.items():
        model.by_name[name].data.copy_(tensor)
    model.reloading = None
    model.version += 1


def _reject_ext(value: Any, msgpack: Any) -> None:
    if isinstance(value, msgpack.Ext):
        raise TypeError("a control message carries an encoded object (tensor or pickle); send plain data only")
    if isinstance(value, list | tuple):
        for item in value:
            _reject_ext(item, msgpack)
    elif isinstance(value, dict):
        for item in value.values():
            _reject_ext(item, msgpack)


class EngineCoreState:
    """The child's engine: vLLM's encoder, the worker, the prefix cache."""

    def __init__(self) -> None:
        from msgspec import msgpack
        from vllm.v1.serial_utils import MsgpackEncoder, UtilityResult

        import mergetune.evaluators.vllm_worker as worker_module

        worker_module.layerwise_reload = lambda: (fake_initialize_layerwise_reload, fake_finalize_layerwise_reload)
        self.msgpack = msgpack
        self.encoder = MsgpackEncoder()
        self.utility_result = UtilityResult
        self.worker: FakeGPUWorker | None = None
        self.cache: dict[str, str] | None = None
        self.refusals = 0
        self.messages: list[int] = []

    def start(self, layout: dict[str, list[int]], dtype: str, prefix_caching: bool, extension: str) -> None:
        inject_extension(FakeGPUWorker, extension)
        torch_dtype = getattr(torch, dtype)
        self.worker = FakeGPUWorker(FakeVllmModel(layout, torch_dtype), torch_dtype)
        self.cache = {} if prefix_caching else None
        self.refusals = 0
        self.messages = []

    def rpc(self, method: Any, args: tuple, kwargs: dict) -> Any:
        frames = self.encoder.encode((0, 1, "collective_rpc", (method, None, args, kwargs)))
        if len(frames) > 1:
            raise TypeError("a control message carries a tensor (vLLM would send it out of band); use the bucket")
        if len(frames[0]) > CONTROL_MESSAGE_BYTES:
            raise ValueError(f"a control message of {len(frames[0])} bytes; the control channel takes ≤ {CONTROL_MESSAGE_BYTES}")
        self.messages.append(len(frames[0]))
        request = self.msgpack.decode(frames[0])
        _reject_ext(request, self.msgpack)
        _, _, _, (method, _, args, kwargs) = request
        result = getattr(self.worker, method)(*args, **(kwargs or {}))
        reply = self.encoder.encode(self.utility_result(result))
        if len(reply) > 1:
            raise TypeError(f"{method} returned a tensor; replies must be plain data")
        return self.msgpack.decode(reply[0])[1]

    def reset_prefix_cache(self) -> bool:
        if self.refusals > 0:
            self.refusals -= 1
            return False
        if self.cache is not None:
            self.cache.clear()
        return True

    def generate(self, prompts: list[str]) -> list[str]:
        model = self.worker.get_model()
        if model.reloading is not None:
            raise RuntimeError("generate during a weight reload: the layers are not loaded")
        digest = hashlib.sha256()
        for param in model.by_name.values():
            digest.update(param.detach().float().numpy().tobytes())
        answers = []
        for prompt in prompts:
            if self.cache is not None and prompt in self.cache:
                answers.append(self.cache[prompt])
                continue
            answer = f"{prompt}:{digest.hexdigest()[:12]}"
            if self.cache is not None:
                self.cache[prompt] = answer
            answers.append(answer)
        return answers

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.worker.get_model().by_name.items()}

    def refuse_resets(self, count: int) -> None:
        self.refusals = count

    def control_messages(self) -> list[int]:
        return list(self.messages)


def engine_core_main(conn: Any, paths: list[str]) -> None:
    sys.path.extend(paths)
    state = None
    while True:
        op, args = conn.recv()
        if op == "exit":
            return
        try:
            if state is None:
                state = EngineCoreState()
            value = None if op == "ping" else getattr(state, op)(*args)
            conn.send(("ok", value))
        except Exception as exc:
            try:
                conn.send(("error", exc))
            except Exception:
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))


def load_weights_into_model(weights: list[tuple[str, torch.Tensor]], model: Any) -> int:
    """The function the backend used to ship with `apply_model(partial(...))` (module level, so it pickles)."""
    return len(model.load_weights(iter(weights)))


class EngineCore:
    """The fake engine-core process; start once per test session (it imports vLLM's serializer, ~10 s)."""

    def __init__(self) -> None:
        from real_vllm import real_vllm_paths

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=engine_core_main, args=(child, real_vllm_paths()), daemon=True)
        self._process.start()
        child.close()
        self.call("ping")

    def call(self, op: str, *args: Any) -> Any:
        self._conn.send((op, args))
        status, value = self._conn.recv()
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        self._conn.send(("exit", ()))
        self._process.join(timeout=10)


class FakeLLM:
    """Stands for `vllm.LLM(..., worker_extension_cls=WORKER_EXTENSION)` on one GPU."""

    def __init__(
        self,
        core: EngineCore,
        layout: dict[str, list[int]],
        dtype: str = "float32",
        enable_prefix_caching: bool = True,
        worker_extension_cls: str = WORKER_EXTENSION,
    ) -> None:
        self.core = core
        self.calls: list[str] = []
        core.call("start", layout, dtype, enable_prefix_caching, worker_extension_cls)

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None) -> list:
        self.calls.append(method if isinstance(method, str) else type(method).__name__)
        return [self.core.call("rpc", method, args, kwargs or {})]

    def apply_model(self, func: Any) -> list:
        """As vLLM's LLMEngine.apply_model: a collective_rpc of the worker's `apply_model` with `func` as its argument."""
        return self.collective_rpc("apply_model", args=(func,))

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return self.core.call("reset_prefix_cache")

    def generate(self, prompts: list[str]) -> list[str]:
        return self.core.call("generate", prompts)

    # Test-only views into the engine.
    def weights(self) -> dict[str, torch.Tensor]:
        return self.core.call("weights")

    def refuse_resets(self, count: int) -> None:
        self.core.call("refuse_resets", count)

    def control_messages(self) -> list[int]:
        return self.core.call("control_messages")
