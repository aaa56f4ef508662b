"""``palm_fast.patch`` / ``palm_fast.unpatch``: swap palm_fast's fast modules into an existing
PaLM-style model, in place, by a plain recursive module walk.

* A **registry** maps a module class to a replacement *factory*. Built in: palm_fast's reference
  modules (``palm_fast.reference``) and the public PaLM-pytorch 0.2.2 package
  (``palm_fast.integrations.palm_pytorch``). Users add their own classes with :func:`register`.
* ``patch`` walks the module tree top-down. For a module whose exact class is registered (and
  whose kind is enabled), it calls the factory; the replacement takes the original's place in its
  parent and the walk does not enter it (it is already built of fast parts). Otherwise the walk
  goes on into the module's children.
* The replacement must keep the original's state: ``patch`` checks that its ``state_dict`` has
  the same keys holding the *same tensor objects* (parameters are shared, never copied), so
  ``state_dict``, ``load_state_dict`` and optimizers built before patching keep working.
  A factory that breaks this is refused (the module stays as it was and the report says why).
* A factory raises :class:`Unsupported` for a layout or option it cannot reproduce exactly; the
  module is then left as it was (its children are still visited) and the skip, with its reason,
  goes into the report and a :class:`PatchWarning`. Never a silent half-patch.
* The report: ``patch`` returns the model (the same object, unless the root module itself was
  replaced) and attaches a :class:`PatchReport` as ``model.palm_fast_report``.
* ``unpatch`` puts every original back, first handing it the replacement's current parameters
  and buffers (e.g. after ``model.to(device)``) and training flag, the submodules swapped in
  after ``patch``, and the forward / backward hooks registered after ``patch`` on the modules
  it built (settings changed on them, ``norm.eps = ...``, go back where the original has the
  same attribute; any other change, a ``forward`` set on the instance included, is dropped
  with a :class:`PatchWarning`). A built module the user moved into a wrapper after
  ``patch`` (``res.fn = checkpoint_wrapper(res.fn)``) gives way to its original inside it.
* A ``torch.compile`` wrapper calls the module it was built with: ``patch`` never replaces a
  wrapper's ``_orig_mod`` (reported as skipped: patch before compiling), though it goes on
  into that module's submodules, which the module looks up when it runs.

Replacing a module bypasses hooks registered on it or on its submodules (a fused block
never calls its children), and methods replaced on an instance (``m.forward = f``), so a
module with either anywhere inside is skipped (reported; the walk goes on into its
children). palm_fast's own fast modules are left as they are.
A factory raising anything but ``Unsupported`` makes ``patch`` put back what the call had
replaced and re-raise. To change options, ``unpatch`` and ``patch`` again: ``patch`` does
not re-enter modules it already replaced.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .ops._checks import check_bool
from .ops._dispatch import _compiled_wrapper, _shadowed_methods, instance_override, methods_replaced

__all__ = ["patch", "unpatch", "register", "unregister", "registered", "PatchOptions",
           "PatchReport", "PatchRecord", "PatchWarning", "Unsupported", "is_patched"]

KINDS = ("rope", "swiglu", "layer_norm", "block", "attention")

# The attribute on a replacement module that holds the module it replaced. Set with
# object.__setattr__ so the original is not registered as a child (no extra state_dict keys).
_ORIGINAL = "_palm_fast_original"
_BUILT = "_palm_fast_built"
_SETTINGS = "_palm_fast_settings"   # its plain attributes as patch built it (see _settings)
_REPORT = "palm_fast_report"


class Unsupported(Exception):
    """Raised by a factory: this module cannot be replaced exactly; the message says why."""


class PatchWarning(UserWarning):
    """Issued by ``patch`` when it skipped a part of the model."""


@dataclasses.dataclass(frozen=True)
class PatchOptions:
    """Which kinds of fast module ``patch`` may use (the keyword flags of :func:`patch`)."""

    rope: bool = True
    swiglu: bool = True
    layer_norm: bool = True
    block: bool = True
    attention: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_bool(f.name, getattr(self, f.name))

    def enabled(self, kind: str) -> bool:
        return bool(getattr(self, kind))


@dataclasses.dataclass(frozen=True)
class PatchRecord:
    """One module ``patch`` replaced (``replacement`` set) or skipped (``reason`` set)."""

    path: str              # dotted module path ("" for the root)
    original: str          # class of the original module
    replacement: str | None = None
    reason: str | None = None


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did: ``patched`` and ``skipped`` records, in walk order."""

    patched: list[PatchRecord] = dataclasses.field(default_factory=list)
    skipped: list[PatchRecord] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was skipped."""
        return not self.skipped

    def __str__(self) -> str:
        lines = [f"palm_fast.patch: {len(self.patched)} module(s) replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {r.path or '<root>'}: {r.original} -> {r.replacement}" for r in self.patched]
        lines += [f"  skipped  {r.path or '<root>'} ({r.original}): {r.reason}" for r in self.skipped]
        return "\n".join(lines)


Factory = Callable[[nn.Module, PatchOptions], nn.Module]
Restore = Callable[[nn.Module, nn.Module], None]


@dataclasses.dataclass(frozen=True)
class _Entry:
    kind: str
    factory: Factory
    restore: Restore | None
    inline: tuple[str, ...]


_REGISTRY: dict[type, _Entry] = {}
_BUILTINS_LOADED: set[str] = set()


def register(cls: type, factory: Factory, *, kind: str = "block", restore: Restore | None = None,
             inline: tuple[str, ...] = (), replace: bool = False) -> None:
    """Teach ``patch`` a module class.

    ``factory(module, options) -> replacement`` builds the fast module from an instance of
    ``cls`` (exact class; subclasses are not matched). The replacement must keep the original's
    state_dict keys, sharing the very same Parameter / buffer objects (assign them, do not copy);
    raise :class:`Unsupported` (with the reason) for an instance it cannot reproduce exactly.
    ``options`` is the :class:`PatchOptions` of the ``patch`` call (a block factory may use it to
    choose its fast pieces). ``kind`` is the ``patch`` flag that enables this entry (one of
    ``rope``, ``swiglu``, ``layer_norm``, ``block``, ``attention``). ``restore(original,
    replacement)``, optional, runs in ``unpatch`` after the state was handed back (e.g. to drop
    caches). ``inline``: kinds that are inline code of ``cls.forward`` (not submodules), so
    they are patched only with the class itself: when ``kind`` is disabled but one of these is
    enabled, the report says so. Registering a class twice raises ValueError unless
    ``replace=True`` (palm_fast's built-in classes count as registered from the start: to
    change one's factory, pass ``replace=True``).
    """
    _load_builtins()   # (first: a built-in loaded later must not overwrite this entry)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls: expected an nn.Module subclass, got {cls!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable, got {type(factory).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if restore is not None and not callable(restore):
        raise TypeError(f"restore: expected a callable or None, got {type(restore).__name__}")
    inline = tuple(inline)
    bad = [k for k in inline if k not in KINDS]
    if bad:
        raise ValueError(f"inline: expected kinds among {KINDS}, got {bad}")
    if cls in _REGISTRY and not replace:
        raise ValueError(f"cls: {_qualname(cls)} is already registered (pass replace=True)")
    _REGISTRY[cls] = _Entry(kind, factory, restore, inline)


def unregister(cls: type) -> None:
    """Forget ``cls`` (KeyError if it is not registered; built-ins included)."""
    _load_builtins()
    del _REGISTRY[cls]


def registered() -> dict[type, str]:
    """The registered classes and their kinds (built-ins included once loaded)."""
    _load_builtins()
    return {cls: e.kind for cls, e in _REGISTRY.items()}


def _load_builtins() -> None:
    """Register palm_fast's reference modules, and PaLM-pytorch's once it has been imported
    (a model built from it implies it is; palm_fast never imports it by itself)."""
    def load(name: str, register_all: Callable[[], None]) -> None:
        # marked loaded first (register() calls back in here), unmarked if it fails: a
        # failed load left patch and generate silently without the built-ins
        _BUILTINS_LOADED.add(name)
        try:
            register_all()
        except BaseException:
            _BUILTINS_LOADED.discard(name)
            raise

    if "reference" not in _BUILTINS_LOADED:
        def ref():
            from .integrations import reference as _ref

            _ref.register_all()
        load("reference", ref)
    if "palm_pytorch" not in _BUILTINS_LOADED and "palm_pytorch.palm_pytorch" in sys.modules:
        def pp():
            from .integrations import palm_pytorch as _pp

            _pp.register_all()
        load("palm_pytorch", pp)
    if "palm_lite" not in _BUILTINS_LOADED and "palm_pytorch.palm_lite" in sys.modules:
        def lite():
            from .integrations import palm_pytorch as _pp

            _pp.register_palm_lite()
        load("palm_lite", lite)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_fast(cls: type) -> bool:
    return cls.__module__.startswith("palm_fast.nn.")


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks"))


def _state_mismatch(orig: nn.Module, new: nn.Module) -> str | None:
    """Why ``new`` does not keep ``orig``'s state (None when it does)."""
    a, b = orig.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        return f"the replacement changes the state_dict keys (missing {missing}, extra {extra})"
    copied = [k for k in a if a[k] is not b[k]]
    if copied:
        return f"the replacement does not share the original tensors (copied: {copied})"
    pa = {id(p) for p in orig.parameters()}
    pb = {id(p) for p in new.parameters()}
    if pa != pb:
        return "the replacement's parameters are not the original Parameter objects"
    return None


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` or a module inside it is a palm_fast replacement."""
    return any(_ORIGINAL in m.__dict__ for m in model.modules())


def _replace(module: nn.Module, path: str, opts: PatchOptions, report: PatchReport) -> nn.Module | None:
    """The replacement of ``module`` (recording it), or None to keep it and visit its children."""
    cls = type(module)
    entry = _REGISTRY.get(cls)
    if entry is None and _is_fast(cls):
        return None   # palm_fast's own fast module (some subclass a reference class): nothing to do
    if entry is None:
        parent = next((c for c in cls.__mro__[1:] if c in _REGISTRY), None)
        if parent is not None and opts.enabled(_REGISTRY[parent].kind):
            if parametrize.is_parametrized(module):   # (its class is a generated subclass)
                names = sorted(module.parametrizations.keys())
                why = (f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} parametrized "
                       "(torch.nn.utils.parametrize), which a replacement would bypass")
            else:
                why = (f"subclass of the registered {_qualname(parent)}: its forward may differ; "
                       "register it explicitly with palm_fast.register")
            report.skipped.append(PatchRecord(path, _qualname(cls), reason=why))
        return None
    if not opts.enabled(entry.kind):
        wanted = [k for k in entry.inline if opts.enabled(k)]
        if wanted:
            report.skipped.append(PatchRecord(path, _qualname(cls), reason=(
                f"{' and '.join(wanted)} {'is' if len(wanted) == 1 else 'are'} inline code of "
                f"{cls.__qualname__}.forward: patched only with {entry.kind}=True")))
        return None
    hooked = next((n for n, m in module.named_modules() if _has_hooks(m)), None)
    if hooked is not None:
        where = "the module has" if hooked == "" else f"its submodule {hooked!r} has"
        report.skipped.append(PatchRecord(path, _qualname(cls), reason=(
            f"{where} hooks registered (or a parametrization such as weight_norm), which a "
            "replacement would bypass")))
        return None
    override = instance_override(module)
    if override is not None:
        sub, name = override
        where = "the module has" if sub == "" else f"its submodule {sub!r} has"
        report.skipped.append(PatchRecord(path, _qualname(cls), reason=(
            f"{where} its own {name!r} set on the instance (replacing its class's method), "
            "which a replacement would bypass")))
        return None
    try:
        new = entry.factory(module, opts)
    except Unsupported as e:
        report.skipped.append(PatchRecord(path, _qualname(cls), reason=str(e)))
        return None
    if new is None or new is module:
        return None
    if not isinstance(new, nn.Module):
        raise TypeError(f"palm_fast.patch: the factory for {_qualname(cls)} returned "
                        f"{type(new).__name__}, expected an nn.Module")
    why = _state_mismatch(module, new)
    if why is not None:
        report.skipped.append(PatchRecord(path, _qualname(cls), reason=why))
        return None
    _copy_training_flags(module, new)
    _mark(new, module)
    accepted = getattr(type(new), "_palm_fast_accepted", None)
    if accepted is not None:   # the replacement's own step once it is in (e.g. drop caches)
        accepted(new, module)
    report.patched.append(PatchRecord(path, _qualname(cls), replacement=_qualname(type(new))))
    return new


def _settings(m: nn.Module) -> dict:
    """``m``'s public plain attributes (``eps``, ``interleaved``, ``scale``, a ``forward`` set
    on the instance), for unpatch to tell what changed after patch."""
    return {k: v for k, v in m.__dict__.items()
            if not k.startswith("_") and k not in ("training", _REPORT)}


def _mark(new: nn.Module, orig: nn.Module) -> None:
    """Record on ``new`` the module it stands for, for unpatch; likewise on each part patch
    built for it that stands for a part of ``orig`` at the same name (not the parts it
    shares), so that a part the user moved into a wrapper after patch
    (``res.fn = checkpoint_wrapper(res.fn)``) is found and put back on its own."""
    object.__setattr__(new, _ORIGINAL, orig)
    # the submodules as patch built them: unpatch hands back any the user swapped in later
    # (a LoRA wrapper around a projection), not just the weights. Not ``new`` itself (its ""
    # entry): that would be a reference cycle, and the model's weights would outlive
    # ``del model`` until the cyclic garbage collector ran.
    object.__setattr__(new, _BUILT, {p: m for p, m in new.named_modules(remove_duplicate=False) if p})
    object.__setattr__(new, _SETTINGS, _settings(new))
    for name, part in new._modules.items():
        counterpart = orig._modules.get(name)
        if part is not None and counterpart is not None and part is not counterpart \
                and _ORIGINAL not in part.__dict__:
            _mark(part, counterpart)


def _walk(module: nn.Module, prefix: str, opts: PatchOptions, report: PatchReport,
          undo: list, memo: dict | None = None) -> None:
    # Every slot, also a module instance registered twice (named_children() lists it once):
    # each occurrence gets the same replacement, so the sharing is kept. ``undo`` records
    # (parent, slot, original) of every replacement made, for a rollback.
    memo = {} if memo is None else memo   # id(child) -> (child, its replacement or None)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if name == "_orig_mod" and _compiled_wrapper(module):
            # torch.compile's wrapper: its forward is bound to this module's __call__ (bound
            # when the wrapper was built), so a replacement put in this slot would never run.
            # The module looks its own submodules up when it runs: the walk goes on into them.
            if id(child) in memo or _ORIGINAL in child.__dict__:
                continue
            entry = _REGISTRY.get(type(child))
            if entry is not None and opts.enabled(entry.kind):
                report.skipped.append(PatchRecord(path, _qualname(type(child)), reason=(
                    f"inside a torch.compile wrapper ({prefix or '<root>'}), which calls the "
                    "module it was built with: patch before compiling (the walk went on into "
                    "its submodules)")))
            memo[id(child)] = (child, None)
            _walk(child, path, opts, report, undo, memo)
            continue
        if id(child) in memo:
            new = memo[id(child)][1]
            if new is not None:
                undo.append((module, name, child))
                setattr(module, name, new)
            continue
        if _ORIGINAL in child.__dict__:   # already a replacement
            continue
        new = _replace(child, path, opts, report)
        memo[id(child)] = (child, new)   # (child kept alive: its id stays unique)
        if new is not None:
            undo.append((module, name, child))
            setattr(module, name, new)
        else:
            _walk(child, path, opts, report, undo, memo)


def patch(model: nn.Module, *, rope: bool = True, swiglu: bool = True, layer_norm: bool = True,
          block: bool = True, attention: bool = True) -> nn.Module:
    """Swap palm_fast's fast modules into ``model`` in place; returns the model.

    Flags enable each kind of replacement: ``layer_norm`` (LayerNorm modules), ``swiglu``
    (SwiGLU activations), ``rope`` (rotary embedding modules, and RoPE inside a replaced block),
    ``attention`` (causal attention inside a replaced block), ``block`` (whole transformer
    blocks: for PaLM-pytorch, rotary embedding and attention are inline code of the block, so
    they need ``block=True``). Parameters stay the same objects; the state_dict is unchanged.

    The :class:`PatchReport` of this call is attached as ``model.palm_fast_report`` (print it);
    every skipped part is also announced with a :class:`PatchWarning`. The returned model is
    ``model`` itself unless ``model``'s own class was replaced (then use the return value).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    opts = PatchOptions(rope=rope, swiglu=swiglu, layer_norm=layer_norm, block=block,
                        attention=attention)
    _load_builtins()
    report = PatchReport()
    root = model
    earlier = model.__dict__.get(_REPORT)
    if earlier is not None:
        report.patched += earlier.patched   # (the report keeps describing them)
    if (earlier is not None and earlier.patched) or is_patched(model):
        # patched before: replacements are kept as they are (their options included); a
        # patch that only skipped modules replaced nothing to keep, so no warning
        warnings.warn("palm_fast.patch: the model was patched before; modules replaced then "
                      "are kept as they are (call palm_fast.unpatch first to patch with other "
                      "options)", PatchWarning, stacklevel=2)
    unsupported = _unsupported_dtypes(model)
    if unsupported:
        # Parameter-free modules (SwiGLU) cannot see the dtype they will get: refuse the model.
        report.skipped.append(PatchRecord("", _qualname(type(model)), reason=(
            f"the model holds {', '.join(unsupported)} tensors; palm_fast kernels take float32, "
            "float16 or bfloat16 (nothing was patched)")))
    elif _ORIGINAL not in model.__dict__:
        new = _replace(model, "", opts, report)
        if new is not None:
            root = new
        else:
            undo: list = []
            try:
                _walk(model, "", opts, report, undo)
            except BaseException:
                # A factory raised something other than Unsupported (a bug, or an error of
                # a registered factory): put back what this call replaced, then re-raise, so
                # the model is never left half-patched without a report.
                for parent, name, orig in reversed(undo):
                    setattr(parent, name, orig)
                raise
    object.__setattr__(root, _REPORT, report)
    if report.skipped:
        warnings.warn(str(report), PatchWarning, stacklevel=2)
    return root


def _hand_back_state(orig: nn.Module, new: nn.Module) -> None:
    """Give ``orig`` the replacement's current parameters and buffers (same names) and mode."""
    for kind in ("_parameters", "_buffers"):
        named = new.named_parameters if kind == "_parameters" else new.named_buffers
        for name, t in named(remove_duplicate=False):
            mod_path, _, leaf = name.rpartition(".")
            try:
                owner = orig.get_submodule(mod_path)
            except AttributeError:
                continue
            slots = getattr(owner, kind)
            if leaf in slots and slots[leaf] is not t:
                slots[leaf] = t
    _copy_training_flags(new, orig)


def _copy_training_flags(src: nn.Module, dst: nn.Module) -> None:
    """``dst``'s train / eval flags from ``src``'s module at the same path (``src``'s own where
    there is none). Modules the two share keep theirs: ``dst.train(src.training)`` set every
    submodule, a shared part the user had put in eval mode (a dropout, a frozen norm) too."""
    shared = {id(m) for m in src.modules()}
    for path, m in dst.named_modules():
        if id(m) in shared:
            continue
        try:
            m.training = src.get_submodule(path).training if path else src.training
        except AttributeError:
            m.training = src.training


def _hand_back_swaps(orig: nn.Module, new: nn.Module) -> None:
    """Put into ``orig`` the submodules the user swapped into the replacement after ``patch``
    (at the same path; one with no such slot in the original is dropped with a warning)."""
    built = new.__dict__.get(_BUILT, {})
    carried: list[str] = []
    for path, child in new.named_modules(remove_duplicate=False):
        if not path or built.get(path) is child or any(path.startswith(c + ".") for c in carried):
            continue
        parent_path, _, leaf = path.rpartition(".")
        try:
            parent = orig.get_submodule(parent_path)
        except AttributeError:
            parent = None
        if parent is None or leaf not in parent._modules:
            warnings.warn(f"unpatch: {path} ({type(child).__name__}) was set after patch and the "
                          f"original {type(orig).__name__} has no such submodule: it is dropped",
                          PatchWarning, stacklevel=4)
        else:
            setattr(parent, leaf, child)
        carried.append(path)


# A module's hook dicts ``unpatch`` moves from a built module to its original (keyed by hook
# id); the state_dict ones are not moved (a load_state_dict pre-hook holds its module).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:   # (a value whose == is not a plain bool)
        return False


def _hand_back_hooks(orig: nn.Module, new: nn.Module, where: str) -> None:
    """Move the hooks registered on ``new`` (a module patch built) after patch onto ``orig``."""
    if new._backward_hooks and orig._backward_hooks and \
            new._is_full_backward_hook != orig._is_full_backward_hook:
        warnings.warn(f"unpatch: {where} has backward hooks registered after patch of another kind "
                      f"(register_backward_hook / register_full_backward_hook) than the original "
                      f"{type(orig).__qualname__}'s own: they are dropped", PatchWarning, stacklevel=2)
        names = [n for n in _HOOK_DICTS if n != "_backward_hooks"]
    else:
        names = list(_HOOK_DICTS)
        if new._backward_hooks:
            orig._is_full_backward_hook = new._is_full_backward_hook
    for name in names:
        src, dst = getattr(new, name), getattr(orig, name)
        if not src or src is dst:
            continue
        if not dst:
            # the dict itself: the handles the user holds (handle.remove()) keep working
            setattr(orig, name, src)
        else:   # (hooks put on the original itself while it was out of the model)
            for k, hook in src.items():
                dst.setdefault(k, hook)
            warnings.warn(f"unpatch: {where} had hooks ({name}) registered both on it after patch "
                          f"and on the original {type(orig).__qualname__} meanwhile: the original "
                          "runs both, but the handles returned for the ones registered on the "
                          "patched module no longer remove them (and prepend order across the "
                          "two is not kept)", PatchWarning, stacklevel=2)
    if any(getattr(new, n) for n in _STATE_DICT_HOOKS):
        warnings.warn(f"unpatch: {where} has state_dict hooks registered after patch; the original "
                      f"{type(orig).__qualname__} does not get them: they are dropped",
                      PatchWarning, stacklevel=2)


def _hand_back_settings(orig: nn.Module, new: nn.Module, where: str) -> None:
    """Give ``orig`` the plain attributes changed on ``new`` after patch that ``orig`` holds
    under the same name with the value ``new`` was built with (``eps``, ``interleaved``,
    ``scale``); warn about any other change (a ``forward`` set on the instance, a setting
    the original does not have), which the original cannot take."""
    before = new.__dict__.get(_SETTINGS)
    if before is None:
        return
    now = _settings(new)
    methods = set(_shadowed_methods(new))
    cls = type(orig).__qualname__
    for k in sorted(before.keys() | now.keys()):
        if k in before and k in now and _same(before[k], now[k]):
            continue
        if k in methods:
            why = (f"{where}.{k} was set on the instance after patch; the original {cls} runs its "
                   f"class's {k}: the change is dropped")
        elif k in before and k in now and k in orig.__dict__ and _same(orig.__dict__[k], before[k]):
            setattr(orig, k, now[k])   # the same setting under the same name
            continue
        elif k not in before and hasattr(type(new), k) and not hasattr(orig, k):
            continue   # palm_fast's own setting (set_weight_cache): nothing for the original
        else:
            what = "deleted" if k not in now else f"set to {now[k]!r}"
            why = (f"{where}.{k} was {what} after patch and the original {cls} has no such setting "
                   "(of that name and value when patched): the change is dropped")
        warnings.warn(f"unpatch: {why}", PatchWarning, stacklevel=2)


def _hand_back_extras(orig: nn.Module, new: nn.Module, where: str) -> None:
    """Hooks and settings added after patch to ``new`` and to the parts patch built for it
    that are still in place (one moved into a wrapper is put back on its own by _unwalk)."""
    shared = {id(m) for m in orig.modules()}
    parts = [("", new, orig)]
    for p, b in new.__dict__.get(_BUILT, {}).items():
        if id(b) in shared:
            continue
        try:
            in_place = new.get_submodule(p) is b
        except AttributeError:
            in_place = False
        if in_place:
            parts.append((p, b, b.__dict__.get(_ORIGINAL)))
    for p, b, o in parts:
        name = ".".join(x for x in (where, p) if x) or "<root>"
        if o is None:
            if _has_hooks(b):
                warnings.warn(f"unpatch: {name} ({type(b).__qualname__}) has hooks registered after "
                              "patch and no counterpart in the original: they are dropped",
                              PatchWarning, stacklevel=2)
            continue
        _hand_back_hooks(o, b, name)
        _hand_back_settings(o, b, name)


def _restore(module: nn.Module, where: str = "") -> nn.Module:
    orig = module.__dict__[_ORIGINAL]
    _hand_back_state(orig, module)
    _hand_back_extras(orig, module, where)
    _hand_back_swaps(orig, module)
    entry = _REGISTRY.get(type(orig))
    if entry is not None and entry.restore is not None:
        entry.restore(orig, module)
    return orig


def _unwalk(module: nn.Module, memo: dict | None = None, prefix: str = "") -> None:
    # Every slot, also a replacement registered twice (named_children() lists it once): each
    # occurrence gets the same original back, restored once.
    memo = {} if memo is None else memo   # id(child) -> (child, the module for its slot)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if id(child) in memo:
            setattr(module, name, memo[id(child)][1])
            continue
        if _ORIGINAL in child.__dict__ and name == "_orig_mod" and _compiled_wrapper(module):
            # (torch.compile(fast module) after patch: the wrapper calls the module it was
            # built with, so an original put in this slot would never run)
            warnings.warn(f"unpatch: {path} is a palm_fast module inside a torch.compile wrapper, "
                          "which keeps calling it: it is left in place (unpatch before compiling, "
                          "or compile the unpatched module again)", PatchWarning, stacklevel=3)
            memo[id(child)] = (child, child)
            continue
        back = _restore(child, path) if _ORIGINAL in child.__dict__ else child
        memo[id(child)] = (child, back)
        if back is not child:
            setattr(module, name, back)
        _unwalk(back, memo, path)


def unpatch(model: nn.Module) -> nn.Module:
    """Put back every original module ``patch`` replaced; returns the (root) model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    root = _restore(model) if _ORIGINAL in model.__dict__ else model
    _unwalk(root)
    model.__dict__.pop(_REPORT, None)
    root.__dict__.pop(_REPORT, None)
    return root


def _share(new: nn.Module, orig: nn.Module, names: list[str]) -> nn.Module:
    """Point ``new``'s parameters / buffers called ``names`` at ``orig``'s objects."""
    for n in names:
        if n in orig._parameters:
            new._parameters[n] = orig._parameters[n]
            new._buffers.pop(n, None)
        elif n in orig._buffers:
            new._buffers[n] = orig._buffers[n]
            new._parameters.pop(n, None)
            if n in orig._non_persistent_buffers_set:
                new._non_persistent_buffers_set.add(n)
            else:
                new._non_persistent_buffers_set.discard(n)
        else:
            raise AttributeError(f"{type(orig).__name__} has no parameter or buffer {n!r}")
    return new


def _unsupported_dtypes(model: nn.Module) -> list[str]:
    found = {str(t.dtype) for t in list(model.parameters()) + list(model.buffers())
             if t is not None and t.is_floating_point()
             and t.dtype not in (torch.float32, torch.float16, torch.bfloat16)}
    return sorted(found)


def check_dtype(module: nn.Module) -> None:
    """Raise Unsupported for parameters or buffers the fast kernels do not take (fp64...)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t is not None and t.is_floating_point() and t.dtype not in (
                torch.float32, torch.float16, torch.bfloat16):
            raise Unsupported(f"{name} is {t.dtype}; palm_fast kernels take float32, float16 or bfloat16")
        if t is not None and t.device.type not in ("cpu", "cuda", "meta"):
            raise Unsupported(f"{name} is on {t.device}; palm_fast kernels run on cpu or cuda")


def check_code(*classes: type) -> None:
    """Raise Unsupported when a method of ``classes`` was replaced at run time (``Cls.forward
    = f``, see ``ops._dispatch.methods_replaced``): a replacement computes the class's own
    code and would drop the change."""
    changed = [n for c in classes for n in methods_replaced(c)]
    if changed:
        raise Unsupported(f"{', '.join(changed)} {'was' if len(changed) == 1 else 'were'} replaced "
                          "at run time; the replacement computes the class's own code and would "
                          "drop the change")


def check_constant_inv_freq(rotary: nn.Module, where: str = "inv_freq") -> None:
    """Raise Unsupported for trained RoPE frequencies: the fused RoPE takes the table as a
    constant (patching went through and the first backward raised)."""
    inv = rotary.inv_freq
    if isinstance(inv, nn.Parameter) or inv.requires_grad:
        raise Unsupported(f"{where} is trained (a Parameter requiring grad); the fused RoPE takes "
                          "the table as a constant")
