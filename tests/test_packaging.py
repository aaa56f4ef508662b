"""What a wheel / sdist carries: every package under palm_fast/ (a hand-written list once
left out palm_fast.integrations, so patch and generate failed in an installed wheel), the
C++ headers the sdist needs to rebuild, and the license pyproject declares."""
from __future__ import annotations

import os
import runpy
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parent.parent


def _setup_kwargs(monkeypatch) -> dict:
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return seen


def test_setup_installs_every_package(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    packages, dirs = set(kw["packages"]), kw["package_dir"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "palm_fast").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= packages, sorted(on_disk - packages)
    assert dirs["palm_fast.kernels"] == "kernels" and dirs["palm_fast.benchmarks"] == "benchmarks"
    assert {"palm_fast.kernels", "palm_fast.benchmarks"} <= packages
    for pkg in packages:   # each maps to a folder with an __init__.py
        top = next(k for k in sorted(dirs, key=len, reverse=True) if pkg == k or pkg.startswith(k + "."))
        folder = ROOT / dirs[top]
        if pkg != top:
            folder = folder / os.path.join(*pkg[len(top) + 1:].split("."))
        assert (folder / "__init__.py").is_file(), pkg


def test_sdist_carries_headers_license_and_tests():
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include csrc *.cpp *.h" in manifest
    assert "include LICENSE" in manifest and "recursive-include tests *.py" in manifest
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_extension_errors_tell_missing_from_unloadable(monkeypatch):
    """An _C built against another torch (undefined symbols) was reported as 'not built'."""
    import sys

    import pytest

    import palm_fast
    from palm_fast import _ext

    monkeypatch.delattr(palm_fast, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "palm_fast._C", raising=False)

    class Finder:
        def __init__(self, msg):
            self.msg = msg

        def find_spec(self, name, path, target=None):
            if name == "palm_fast._C":
                raise ImportError(self.msg)
            return None

    for msg, want in (("/x/_C.so: undefined symbol: _ZN3c104impl", "another torch"),
                      ("No module named 'palm_fast._C'", "are not built"),
                      ("initialization failed", "do not load")):
        monkeypatch.setattr(sys, "meta_path", [Finder(msg), *sys.meta_path])
        with pytest.raises(ImportError, match=want):
            _ext.cpp.__wrapped__()


def test_an_interrupt_during_the_extension_import_stays_an_interrupt(monkeypatch):
    """A Ctrl-C during the first (lazy) import of _C came back from pybind11 as
    ImportError("initialization failed") and was reported as "not built"; code handling
    KeyboardInterrupt for a clean shutdown got an ImportError. It is re-raised as it was."""
    import sys

    import pytest

    import palm_fast
    from palm_fast import _ext

    monkeypatch.delattr(palm_fast, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "palm_fast._C", raising=False)

    class Finder:
        def find_spec(self, name, path, target=None):
            if name == "palm_fast._C":
                try:
                    raise KeyboardInterrupt
                except KeyboardInterrupt as k:
                    raise ImportError("initialization failed") from k
            return None

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    with pytest.raises(KeyboardInterrupt):
        _ext.cpp.__wrapped__()


def _setup_globals(monkeypatch) -> dict:
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")


def test_compiler_without_shared_libstdcxx_links_torchs(monkeypatch):
    """The GPU image's g++ has no libstdc++.so of its own and linked libstdc++.a into _C:
    a private exception runtime beside the process's, and every C++ exception thrown in _C
    (a failed TORCH_CHECK) was a SIGSEGV. Such a compiler links the libstdc++.so this
    process has loaded (torch's); a usual compiler keeps its default. The compiler command
    may carry a launcher ("ccache g++"), as setuptools' compiler_cxx does."""
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    pick = _setup_globals(monkeypatch)["_shared_libstdcxx"]
    asked = []

    class Done:
        def __init__(self, out):
            self.stdout = out

    def bare(argv, **k):   # a compiler with no shared libstdc++ of its own
        asked.append(argv)
        return Done("libstdc++.so\n")

    monkeypatch.setattr(subprocess, "run", bare)
    args = pick("g++")
    assert len(args) == 1 and os.path.isabs(args[0]) and os.path.exists(args[0])
    assert os.path.basename(args[0]).startswith("libstdc++.so")
    loaded = Path(args[0]).resolve()
    with open("/proc/self/maps") as maps:
        assert any(Path(line.split()[-1]).resolve() == loaded for line in maps if "libstdc++" in line)
    assert pick("ccache g++ -m64") == args and pick(["ccache", "g++"]) == args
    assert asked[1:] == [["ccache", "g++", "-m64", "-print-file-name=libstdc++.so"],
                         ["ccache", "g++", "-print-file-name=libstdc++.so"]]
    own = Path(args[0])   # a compiler with its own shared libstdc++: nothing added
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done(f"{own}\n"))
    assert pick("g++") == []

    def missing(*a, **k):
        raise FileNotFoundError("no such compiler")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.warns(UserWarning, match="could not ask the C\\+\\+ compiler"):
        assert pick("no-such-c++") == []
    monkeypatch.setattr(subprocess, "run", bare)
    monkeypatch.setitem(pick.__globals__, "_loaded_libstdcxx", lambda: None)
    with pytest.warns(UserWarning, match="links libstdc\\+\\+ statically"):
        assert pick("g++") == []


def test_build_asks_the_linking_compiler(monkeypatch):
    """The build asks setuptools' C++ compiler command (the one that links), not a guess."""
    g = _setup_globals(monkeypatch)
    seen = []
    # (run_path returns a copy of the module's globals: patch the functions' own)
    monkeypatch.setitem(g["_BuildExt"].build_extensions.__globals__, "_shared_libstdcxx",
                        lambda cxx: seen.append(cxx) or ["/x/libstdc++.so.6"])
    base = g["_BuildExt"].__mro__[1]
    monkeypatch.setattr(base, "build_extensions", lambda self: None)

    class Compiler:
        compiler_cxx = ["ccache", "/opt/gcc/bin/g++"]

    cmd = g["_BuildExt"].__new__(g["_BuildExt"])
    cmd.compiler, cmd.extensions = Compiler(), [g["ext"]]
    g["ext"].extra_link_args = ["-fopenmp"]
    cmd.build_extensions()
    cmd.build_extensions()   # (no duplicate argument on a second run)
    assert seen == [["ccache", "/opt/gcc/bin/g++"]] * 2
    assert g["ext"].extra_link_args == ["-fopenmp", "/x/libstdc++.so.6"]


def test_extension_carries_no_private_cxx_runtime():
    """The built _C defines no C++ exception runtime of its own (see above)."""
    import shutil
    import subprocess

    import pytest

    from palm_fast._ext import cpp

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs binutils' nm")
    out = subprocess.run([nm, "-D", "--defined-only", cpp().__file__], capture_output=True,
                         text=True, check=True).stdout
    defined = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert not defined & {"__cxa_throw", "__cxa_allocate_exception", "__gxx_personality_v0"}


def test_cpp_kernels_run_without_the_gil_and_still_raise():
    """Every _C entry point releases the GIL while its kernel runs (a Python thread beside a
    long decode was frozen for the whole call), and a failed check still comes back as a
    RuntimeError with its message once the GIL is retaken. A second thread, woken just
    before a call of some 20-80 ms, spins on a counter; with a 1 s switch interval it can
    only run during the call if the call lets go of the GIL (with the GIL held: 0, 6 runs
    of 6; released: 6 of 6)."""
    import sys
    import threading

    import pytest
    import torch

    from palm_fast._ext import cpp

    x, w = torch.randn(4096, 4096), torch.randn(4096)
    ln = cpp().layer_norm_fwd
    ln(x, w, None, 1e-5)   # warm (the first call's import and allocations)
    counter, go, stop = [0], threading.Event(), threading.Event()

    def spin():
        go.wait()
        while not stop.is_set():
            counter[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    t = threading.Thread(target=spin)
    try:
        t.start()
        go.set()      # the spinner now waits for the GIL, which this thread holds
        out = ln(x, w, None, 1e-5)   # kept: freeing a tensor lets go of the GIL too
        ran = counter[0]
        del out
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert ran > 0
    t4 = torch.randn(3)
    with pytest.raises(RuntimeError, match="rope_cpu: expected 4-dim CPU tensors"):
        cpp().rope_cpu(t4, t4, t4, t4, t4, torch.zeros(3, dtype=torch.long), False, False, False)
