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


ext = CppExtension(
    name="palm_fast._C",
    sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": _cxx_flags()},
    extra_link_args=["-fopenmp"],
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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
