"""Triton launches run on the current CUDA device, not their tensors' device: every launch of
ours runs with the tensors' device made current (``kernels._common.launch_device``), as
torch's own ops do. Without a second GPU these tests fake the CUDA device state: a fake
current-device index and a recording ``torch.cuda.device``, with FakeTensors on ``cuda:1``."""
from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest
import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from palm_fast.kernels import _common


class _FakeCudaState:
    """Stands in for torch.cuda's current device: ``current_device()`` and a
    ``device(index)`` context that switches it and records each switch."""

    def __init__(self, current: int = 0):
        self.current = current
        self.switches: list[int] = []
        self.queries = 0

    def current_device(self) -> int:
        self.queries += 1
        return self.current

    def device(self, index: int):
        state = self

        class _Ctx:
            def __enter__(self):
                state.switches.append(index)
                self.prev, state.current = state.current, index

            def __exit__(self, *exc):
                state.current = self.prev
                return False

        return _Ctx()


@pytest.fixture
def cuda_state(monkeypatch):
    state = _FakeCudaState(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", state.current_device)
    monkeypatch.setattr(torch.cuda, "device", state.device)
    return state


def _fake_cuda(index: int) -> torch.Tensor:
    # (a FakeTensor on a CUDA device first makes a real tensor there when CUDA is available:
    # "invalid device ordinal" for cuda:1 on a one-GPU machine; the fake needs no context)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fake_tensor, "init_gpu_context", lambda device: None)
        return FakeTensor(FakeTensorMode(), torch.empty(4, device="meta"), torch.device("cuda", index))


def test_launcher_runs_on_its_tensors_device(cuda_state):
    seen = []

    @_common.on_tensor_device
    def launcher(x, y, *, flag=False):
        seen.append((cuda_state.current, flag))
        return "out"

    assert launcher.device_guarded
    assert launcher(_fake_cuda(1), 3, flag=True) == "out"
    assert seen == [(1, True)] and cuda_state.switches == [1]
    assert cuda_state.current == 0                      # restored
    # already current: no switch
    launcher(_fake_cuda(0), 3)
    assert seen[-1] == (0, False) and cuda_state.switches == [1]
    # the first tensor argument decides, wherever it is
    launcher(None, _fake_cuda(1))
    assert seen[-1] == (1, False) and cuda_state.switches == [1, 1]


def test_launcher_restores_the_device_after_an_error(cuda_state):
    @_common.on_tensor_device
    def launcher(x):
        assert cuda_state.current == 1
        raise ValueError("bad launch")

    with pytest.raises(ValueError, match="bad launch"):
        launcher(_fake_cuda(1))
    assert cuda_state.current == 0


def test_cpu_launches_make_no_cuda_query(cuda_state):
    """CPU tensors (the interpreter, compile-only lowering) never touch torch.cuda."""
    @_common.on_tensor_device
    def launcher(x):
        return x.sum()

    assert launcher(torch.ones(3)) == 3
    with _common.launch_device(torch.device("cpu")):
        pass
    assert cuda_state.queries == 0 and cuda_state.switches == []


# Modules whose functions launch Triton kernels (``kernel[grid](...)``).
_LAUNCH_MODULES = ["palm_fast.kernels.mqa_decode", "palm_fast.kernels.projection",
                   "palm_fast.kernels.swiglu", "palm_fast.kernels.rope", "palm_fast.ops.block",
                   "palm_fast.fusion.codegen"]


def _launching_functions(module):
    """(qualified name, function node, launch call nodes) of every function in ``module``
    that calls a subscripted callable (a Triton launch ``kernel[grid](...)``)."""
    tree = ast.parse(inspect.getsource(module))
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if isinstance(child, ast.FunctionDef):
                    calls = [n for n in ast.walk(child)
                             if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]
                    if calls:
                        found.append((name, child, calls))
                visit(child, name + ".")

    visit(tree, "")
    return found


def _inside_launch_device(fn_node, call) -> bool:
    """Whether ``call`` is in the body of a ``with launch_device(...)`` in ``fn_node``."""
    for w in ast.walk(fn_node):
        if isinstance(w, ast.With) and any(
                isinstance(i.context_expr, ast.Call)
                and getattr(i.context_expr.func, "id", None) == "launch_device" for i in w.items):
            if any(n is call for stmt in w.body for n in ast.walk(stmt)):
                return True
    return False


def test_every_kernel_module_is_scanned():
    """Every file of palm_fast.kernels that defines Triton kernels is in _LAUNCH_MODULES (a new
    kernel file must be added there to be checked)."""
    import pathlib

    import palm_fast.kernels as kernels

    for path in sorted(pathlib.Path(kernels.__file__).parent.glob("*.py")):
        if not path.stem.startswith("_") and "@triton.jit" in path.read_text():
            assert f"palm_fast.kernels.{path.stem}" in _LAUNCH_MODULES, path.name


@pytest.mark.parametrize("module_name", _LAUNCH_MODULES)
def test_every_triton_launch_is_device_guarded(module_name):
    module = importlib.import_module(module_name)
    functions = _launching_functions(module)
    assert functions, f"{module_name}: no launching function found (the scan is broken)"
    for name, node, calls in functions:
        obj = module
        for part in name.split("."):
            obj = inspect.getattr_static(obj, part)
        obj = getattr(obj, "__func__", obj)     # staticmethod / classmethod
        if getattr(obj, "device_guarded", False):
            continue
        unguarded = [c for c in calls if not _inside_launch_device(node, c)]
        assert not unguarded, (f"{module_name}.{name} launches {ast.unparse(unguarded[0].func)} "
                               f"without the tensors' CUDA device current (decorate it with "
                               f"on_tensor_device or launch inside launch_device)")


def test_generate_captures_and_replays_on_the_model_device(cuda_state, monkeypatch):
    """generate's CUDA graph: its streams, warm-up, capture and replays run with the model's
    device current (torch.cuda.Stream() and torch.cuda.graph take the current device)."""
    from palm_fast import generation

    log = []

    class _Stream:
        def __init__(self):
            log.append(("stream", cuda_state.current))

        def wait_stream(self, other):
            pass

    class _Graph:
        def replay(self):
            log.append(("replay", cuda_state.current))

    class _Capture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            log.append(("capture", cuda_state.current))

        def __exit__(self, *exc):
            return False

    class _StreamCtx(_Capture):
        pass

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", _StreamCtx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", _Capture)

    class _Tokens:   # stands in for the static token tensor on cuda:1
        device = torch.device("cuda", 1)

        def clone(self):
            return self

        def copy_(self, other):
            return self

    def step(tokens):
        log.append(("step", cuda_state.current))
        return "logits"

    graphed = generation._GraphedStep(step, _Tokens())
    assert graphed(_Tokens()) == "logits"
    assert log and all(dev == 1 for _, dev in log), log
    assert [k for k, _ in log].count("step") == 3 and log[-1][0] == "replay"
    assert cuda_state.current == 0


def test_scan_sees_a_missing_guard():
    """The launch scan itself: an unguarded launch is reported."""
    src = textwrap.dedent("""
        def bad(x):
            kernel[(1,)](x)

        def good(x):
            with launch_device(x.device):
                kernel[(1,)](x)
    """)
    tree = ast.parse(src)
    fns = {n.name: n for n in tree.body}
    bad_call = next(n for n in ast.walk(fns["bad"]) if isinstance(n, ast.Call))
    good_call = next(n for n in ast.walk(fns["good"]) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Subscript))
    assert not _inside_launch_device(fns["bad"], bad_call)
    assert _inside_launch_device(fns["good"], good_call)
