"""A low-overhead eager path for the ``palm_fast::`` custom ops.

Calling a ``torch.library.custom_op`` goes through the dispatcher and its Python autograd
glue: about 50 us of CPU time per call on our CI-class CPU, more than many of our kernels
take on a GPU. In eager mode the public functions therefore run the *same* device
implementations and the *same* ``setup_context`` / ``backward`` functions through a plain
``torch.autograd.Function``; under ``torch.compile`` (and for ``opcheck``) they call the
custom op, which carries the fake kernel the compiler needs. Tests check that both paths
give bitwise-equal outputs and gradients.
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch.autograd import forward_ad as _fwad
from torch.nn.modules import module as _torch_module

_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def fake_mode_on() -> bool:
    """Whether a ``FakeTensorMode`` is active (``make_fx(tracing_mode="fake")``, a bare
    ``with FakeTensorMode():``): tensors made now have no data."""
    if _FAKE_KEY is not None:
        return torch._C._get_dispatch_mode(_FAKE_KEY) is not None
    from torch._guards import detect_fake_mode  # (older torch)

    return detect_fake_mode() is not None


# Cached constants read while a CUDA graph was being captured: the graph holds their
# addresses, not the tensors, so an LRU eviction would free memory a replay still reads.
# Kept for the life of the process (a few small tensors per captured configuration).
_PINNED: dict[tuple, torch.Tensor] = {}


def cuda_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA: no query)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def cached_constant(maxsize: int):
    """``functools.lru_cache`` for eager-mode constant tensors (default offsets, frequencies,
    scratch), built outside inference mode: a cached tensor first made under
    ``torch.inference_mode()`` (e.g. by ``generate``) could not be saved for a later backward.
    Under a ``FakeTensorMode`` the tensor is made and not cached: a cached fake tensor broke
    every later real call in the process. A tensor handed out during a CUDA graph capture is
    pinned (``_PINNED``): evicted from the LRU later, it stays allocated for the graph."""
    def deco(fn):
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False):
                return fn(*args)

        @functools.wraps(fn)
        def get(*args):
            if fake_mode_on():
                return fn(*args)
            t = cached(*args)
            if cuda_capturing():
                _PINNED[(fn.__module__, fn.__qualname__, *args, id(t))] = t
            return t

        get.cache_clear = cached.cache_clear
        get.cache_info = cached.cache_info
        return get
    return deco


_DISPATCH_STACK_LEN = getattr(torch._C, "_len_torch_dispatch_stack", None)


def compiling() -> bool:
    """True while torch.compile / export traces, ``torch.jit.trace`` records, or any
    ``TorchDispatchMode`` is active (``make_fx``, ``FakeTensorMode``, ``FlopCounterMode``, a
    user's mode): use the custom op then. Such a tracer or mode cannot see a call into
    ``palm_fast._C``: ``jit.trace`` and ``make_fx`` recorded only the empty output tensors (the
    traced graph returned uninitialised memory), and a fake tensor, which has no data,
    failed inside the kernel."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return _DISPATCH_STACK_LEN is not None and _DISPATCH_STACK_LEN() > 0


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)


def exporting() -> bool:
    """True while torch.export traces (False under a torch without torch.compiler.is_exporting,
    such as 2.6)."""
    return _IS_EXPORTING is not None and bool(_IS_EXPORTING())


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    raise TypeError("no tensor argument")


def _autocast_on() -> bool:
    return torch._C._is_any_autocast_enabled()


def parts_hooked(*mods) -> bool:
    """Whether calling one of ``mods`` would run more than its class's ``forward``: hooks of
    its own, a ``forward`` set on the instance (a LoRA or adapter done by assignment), or
    hooks for every module (written out: it runs on every forward of a fused block). A fused
    path that reads such a module's weights instead of calling it must not be taken."""
    _m = _torch_module
    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks \
            or _m._global_backward_pre_hooks:
        return True
    for m in mods:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks \
                or "forward" in m.__dict__:
            return True
    return False


def _is_method(attr) -> bool:
    return isinstance(attr, (types.FunctionType, staticmethod, classmethod))


def _compiled_wrapper(m) -> bool:
    """``torch.compile(module)``'s wrapper: it sets its own ``forward`` on the instance (the
    compiled original's); the module inside is what to look at."""
    return type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None),
                                                                torch.nn.Module)


def unwrap_compiled(m):
    while _compiled_wrapper(m):
        m = m._orig_mod
    return m


def instance_override(module: torch.nn.Module, recurse: bool = True) -> tuple[str, str] | None:
    """``(submodule path, name)`` of the first method of a module's class that is replaced on
    the instance (``m.forward = f``, ``block.get_mask = f``: adapters, LoRA, sliding-window
    masks done by assignment), in ``module`` and (``recurse``) its submodules; None if there
    is none. Code that takes such a module apart instead of calling it would skip that code.
    A ``torch.compile`` wrapper is looked through (its own ``forward`` is the compiled
    original's)."""
    mods = module.named_modules(remove_duplicate=False) if recurse else (("", unwrap_compiled(module)),)
    for path, m in mods:
        if _compiled_wrapper(m):
            continue   # (its _orig_mod is visited as its child)
        hit = _shadowed_methods(m)
        if hit:
            return path, min(hit)
    return None


def _shadowed_methods(m) -> list[str]:
    """The names in ``m.__dict__`` that name a method of its class: for each, the class that
    defines it nearest in the MRO (a subclass may redefine a name as a non-method). Looks up
    only the instance's own names (a few dozen), never walks nn.Module's namespace, so no
    cache is needed and any change to a class is seen."""
    mro = type(m).__mro__
    hit = []
    for n in m.__dict__:
        for c in mro:
            d = c.__dict__
            if n in d:
                if _is_method(d[n]):
                    hit.append(n)
                break
    return hit


def methods_replaced(cls: type) -> list[str]:
    """Methods of ``cls`` and of its bases below ``nn.Module`` that were not defined in that
    class's body: assigned at run time (``Cls.forward = f``, a monkeypatch). A function tells
    by its ``__module__`` / ``__qualname__`` (decorators built with ``functools.wraps`` keep
    them); any other callable in a class's namespace (``functools.partialmethod``, a
    ``partial``, a mock) counts as replaced. Classes, properties and dunder names are not
    looked at."""
    out = []
    for c in cls.__mro__:
        if c is object or c.__module__.startswith("torch."):
            continue
        for name, attr in vars(c).items():
            if name.startswith("__") and name.endswith("__"):
                continue
            f = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if _is_method(attr) or hasattr(f, "__wrapped__"):   # (functools.wraps keeps both
                # names: a decorated method, functools.lru_cache included)
                if getattr(f, "__module__", None) == c.__module__ and \
                        getattr(f, "__qualname__", None) == f"{c.__qualname__}.{name}":
                    continue
            elif isinstance(attr, (type, property)) or not (
                    callable(attr) or isinstance(attr, functools.partialmethod)):
                continue
            out.append(f"{c.__name__}.{name}")
    return out


def forward_replaced(model, cls: type) -> bool:
    """Whether ``model``'s forward is not ``cls.forward``: a subclass's own, or one set on the
    instance (as wrappers do). A fast path that takes ``model`` apart instead of calling it
    would skip that code."""
    return type(model).forward is not cls.forward or "forward" in vars(model)


def autocast_changes_dtype(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether an autocast region for x's device is on and would cast x or a weight (their
    dtypes differ from autocast's): a fused path taking one dtype cannot follow it then."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return False
    dt = torch.get_autocast_dtype(dev)
    return any(t.dtype != dt for t in (x, *weights))


def run_without_autocast(fn: Callable, *args):
    """``fn(*args)``, with autocast off for the device type of its first tensor argument
    when an autocast region is on (free otherwise).

    palm_fast's ops compute in the dtypes of their inputs, as custom kernels do: inside an
    ``autocast`` region an implementation's own ATen GEMMs must not be recast (a bf16
    ``addmm`` meeting an fp32 ``addmm_`` raised; a deliberate fp32 GEMM became bf16)."""
    if not _autocast_on():
        return fn(*args)
    dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
    if dev is None:
        return fn(*args)
    with torch.autocast(dev, enabled=False):
        return fn(*args)


def autocast_off(fn: Callable) -> Callable:
    """Decorator: ``fn`` runs through ``run_without_autocast`` (a function, not a partial:
    torch.compile traces ``autograd.Function.forward`` only when it is one)."""
    @functools.wraps(fn)
    def wrapper(*args):
        return run_without_autocast(fn, *args)
    return wrapper


def eager_function(name: str, impls: dict[str, Callable], setup_context: Callable,
                   backward: Callable, *, double_backward: bool = False) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` whose forward calls ``impls[device type](*args)`` and whose
    ``setup_context(ctx, inputs, output)`` / ``backward(ctx, *grads)`` are the functions
    registered with the custom op's ``register_autograd``.

    ``double_backward``: the backward is itself differentiable (built from differentiable
    ops). Otherwise it is ``once_differentiable``: differentiating a gradient it returned
    (``create_graph=True``) raises instead of silently dropping the second-order terms, as
    the custom op does (it has no autograd formula for its backward op).
    """
    if not double_backward:
        backward = _once_differentiable(backward, name)
    backward = autocast_off(backward)   # (a CPU backward runs on the calling thread, inside
                                        # the caller's autocast region if called there)

    # Old-style forward(ctx, ...): the separate setup_context style binds the arguments
    # through inspect.signature on every call, which costs more than the kernels we save.
    def forward(ctx, *args):
        dev = _device_type(args)
        if dev not in impls:
            raise NotImplementedError(f"palm_fast::{name}: no kernel for device type {dev!r} "
                                      f"(available: {sorted(impls)})")
        output = run_without_autocast(impls[dev], *args)
        setup_context(ctx, args, output)
        ctx.palm_fast_eager = True  # the backward stays on the eager path too
        return output

    return type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def _once_differentiable(backward: Callable, name: str) -> Callable:
    """``backward`` run without recording; under ``create_graph=True`` each gradient it
    returns is tied, through a node that raises when it is differentiated, to the tensors
    the true second derivative depends on (the saved tensors and incoming gradients that
    require grad). So differentiating such a gradient raises instead of silently losing its
    second-order terms. (``torch.autograd.function.once_differentiable`` only adds its
    error node when an incoming gradient requires grad, and on detached copies, so a
    gradient penalty would still come out silently wrong.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        anchors = [t for t in (*ctx.saved_tensors, *grads)
                   if isinstance(t, torch.Tensor) and t.requires_grad and t.numel() > 0]
        if not anchors:
            return out
        err = torch._C._functions.DelayedError(
            f"palm_fast.ops ({name}): double backward is not supported (a gradient computed "
            "with create_graph=True was differentiated); use the reference modules "
            "(palm_fast.reference) for higher-order gradients", len(anchors))
        errs = err(*anchors)
        errs = errs if isinstance(errs, tuple) else (errs,)
        link = sum(e.reshape(-1)[0].float() for e in errs)   # a 0-dim tensor behind the node
        never = torch.zeros((), dtype=torch.bool, device=link.device)

        def tie(t):   # t's values, with a graph edge to the error node
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return t
            return torch.where(never.to(t.device), link.to(device=t.device, dtype=t.dtype), t)

        return tuple(tie(t) for t in out) if isinstance(out, tuple) else tie(out)

    return wrapper


def once_differentiable(name: str) -> Callable:
    """Decorator form of the above for a hand-written ``autograd.Function.backward``."""
    return lambda backward: _once_differentiable(backward, name)


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def check_no_transforms(*tensors) -> None:
    """Raise for torch.func transforms and forward-mode AD, which the eager path's kernels do
    not follow: a dual tensor's tangent was silently dropped (or, inside a block, came out
    wrong) and vmap failed on a storage-less tensor deep in the C++ kernel."""
    if _FUNCTORCH_ACTIVE is not None and _FUNCTORCH_ACTIVE():
        raise RuntimeError("palm_fast's ops do not support torch.func transforms (vmap, grad, jvp, "
                           "...); use the reference modules (palm_fast.reference) there")
    if _fwad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError("palm_fast's ops do not support forward-mode AD (dual tensors of "
                           "torch.autograd.forward_ad); use the reference modules "
                           "(palm_fast.reference) there")


def check_traced(*tensors) -> None:
    """The transform checks of the eager path (:func:`check_no_transforms`) for a call that
    takes the custom op under a dispatch mode (``FlopCounterMode``, ``make_fx``) or
    ``torch.jit.trace``: the custom ops have no forward-AD formula, and torch returned no
    tangent (``jvp`` gave zeros) instead of raising. (Not while torch.compile traces: the
    checks read Python state of the real tensors, which the traced fakes do not carry; the
    README lists forward-mode AD under torch.compile as unsupported.)"""
    if not torch.compiler.is_compiling():
        check_no_transforms(*tensors)


def needs_grad(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (None entries allowed). Raises
    for torch.func transforms and forward-mode AD (:func:`check_no_transforms`)."""
    check_no_transforms(*tensors)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_op(eager: type[torch.autograd.Function], impls: dict[str, Callable], device_type: str,
             grad: bool) -> Callable:
    """What an eager-mode public function calls: the ``eager_function`` when a gradient is
    needed (``grad``) or the device has no implementation (its forward raises the error),
    else the device implementation itself (same bits, no ``autograd.Function`` cost)."""
    if grad or device_type not in impls:
        return eager.apply
    if _autocast_on():
        return functools.partial(run_without_autocast, impls[device_type])
    return impls[device_type]


def eager_ctx(ctx) -> bool:
    """In a shared ``backward``: True when the forward ran on the eager path (the backward
    may then call implementations directly); False under the custom op (call custom ops,
    which AOTAutograd can trace)."""
    return getattr(ctx, "palm_fast_eager", False)


def call_impl(impls: dict[str, Callable], *args):
    """Run a (non-differentiable) op's device implementation directly (autocast off)."""
    return run_without_autocast(impls[_device_type(args)], *args)
