"""Access to the compiled C++ extension ``palm_fast._C`` with a clear error when
it is missing (no silent fallback to the reference)."""
from __future__ import annotations

import functools


@functools.cache
def cpp():
    """Return the ``palm_fast._C`` module or raise an actionable ImportError."""
    try:
        from palm_fast import _C
    except ImportError as e:  # pragma: no cover - depends on the build
        cause = e.__cause__ or e.__context__
        while cause is not None:   # a Ctrl-C during the first import comes back wrapped by
            if not isinstance(cause, Exception):   # pybind11 ("initialization failed")
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        if isinstance(e, ModuleNotFoundError) or "No module named" in str(e):
            why = "are not built"
        elif "undefined symbol" in str(e) or "shared object" in str(e):
            # the file is there but does not load: typically built against another torch
            import torch

            why = (f"do not load (built against another torch than this {torch.__version__}? "
                   f"rebuild them)")
        else:
            why = "do not load"
        raise ImportError(
            f"palm_fast's C++ CPU kernels (palm_fast._C) {why}. Build them with "
            "`pip install --no-build-isolation -e .` from the repository root (needs gcc "
            f"and ninja, and torch installed first). Original error: {e}"
        ) from e
    return _C

