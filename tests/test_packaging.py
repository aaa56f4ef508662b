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
                      ("No module named 'palm_fast._C'", "are not built")):
        monkeypatch.setattr(sys, "meta_path", [Finder(msg), *sys.meta_path])
        with pytest.raises(ImportError, match=want):
            _ext.cpp.__wrapped__()
