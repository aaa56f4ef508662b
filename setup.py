"""Build palm_fast: the Python package, the Triton sources (installed as
``palm_fast.kernels``), the benchmark suite (installed as ``palm_fast.benchmarks``)
and the C++ CPU kernels (``palm_fast._C``).

The C++ extension is CPU-only (the GPU path is Triton), so it builds on a machine
without CUDA.  Build with ``pip install --no-build-isolation -e .`` after torch is
installed, so the extension is compiled against the torch you run.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cxx_flags():
    # -g0: Python's own CFLAGS carry -g, which made _C 43 MB of debug info (0.9 MB without)
    # -ffp-contract=off: no FMAs but the ones the kernels write (at::vec::fmadd). GCC's
    # default contracts a * b + c anywhere, so the same product could be rounded in one pass
    # and not in the next (the LayerNorm backward's dy * w: dx of a 1-wide row was up to
    # 0.04 instead of 0 at eps 1e-12). Measured neutral on the CPU benchmarks.
    flags = ["-O3", "-g0", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    # Vectorise for the machine that builds (CI and users build where they run);
    # PALM_FAST_PORTABLE=1 gives a portable binary.
    if os.environ.get("PALM_FAST_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


def _loaded_libstdcxx():
    """The libstdc++.so this process (torch) has loaded, or None (no /proc, none loaded)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)   # the path is the 6th field (it may hold spaces)
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.isabs(path) and os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def _shared_libstdcxx(cxx):
    """Link arguments that make the extension use the C++ runtime torch uses.

    A compiler that has no shared libstdc++ of its own (the GPU image's /opt/gcc g++ 13)
    links libstdc++.a into the extension: it then carried a private copy of the exception
    runtime (``__cxa_throw``, ``__gxx_personality_v0``) beside the process's libstdc++.so, and
    any C++ exception thrown inside it (a failed ``TORCH_CHECK``) crashed the process with
    SIGSEGV instead of raising. Such a compiler gets the libstdc++.so that this process
    (torch) has loaded on its link line, ahead of the driver's static one (the soname goes
    into NEEDED). ``cxx``: the C++ compiler command that links, a string or an argv list
    (a launcher and flags allowed: ``"ccache g++"``). Returns [] where the compiler links
    libstdc++ dynamically (the usual case); warns where it cannot tell."""
    import shlex
    import subprocess
    import warnings

    argv = shlex.split(cxx) if isinstance(cxx, str) else list(cxx)
    try:
        found = subprocess.run([*argv, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"palm_fast: could not ask the C++ compiler {argv} for its libstdc++ ({e}); "
                      "if it links libstdc++ statically, C++ errors inside palm_fast._C will crash",
                      stacklevel=2)
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    loaded = _loaded_libstdcxx()
    if loaded is None:
        warnings.warn(f"palm_fast: the C++ compiler {argv} has no shared libstdc++ and none is "
                      "loaded here: palm_fast._C links libstdc++ statically (C++ errors inside it "
                      "may crash the process)", stacklevel=2)
        return []
    return [loaded]


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, asking the compiler that links (``compiler_cxx``: sysconfig's
    or ``CXX``, launcher included) whether it needs torch's libstdc++ on the link line."""

    def build_extensions(self):
        extra = _shared_libstdcxx(getattr(self.compiler, "compiler_cxx", None) or ["c++"])
        for e in self.extensions:
            have = list(e.extra_link_args or [])
            e.extra_link_args = have + [a for a in extra if a not in have]
        super().build_extensions()


ext = CppExtension(
    name="palm_fast._C",
    sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": _cxx_flags()},
    extra_link_args=["-fopenmp"],   # (+ torch's libstdc++ where needed: _BuildExt)
)

# Every package under palm_fast/ (a hand-written list once left out palm_fast.integrations:
# patch and generate failed in a wheel), plus the two folders installed under palm_fast.
PACKAGES = find_packages(include=["palm_fast", "palm_fast.*"]) + ["palm_fast.kernels", "palm_fast.benchmarks"]

setup(
    packages=PACKAGES,
    package_dir={
        "palm_fast": "palm_fast",
        "palm_fast.kernels": "kernels",
        "palm_fast.benchmarks": "benchmarks",
    },
    ext_modules=[ext],
    cmdclass={"build_ext": _BuildExt},
)
