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
        raise ImportError(
            "palm_fast's C++ CPU kernels (palm_fast._C) are not built. Build them with "
            "`pip install --no-build-isolation -e .` from the repository root (needs gcc "
            f"and ninja, and torch installed first). Original error: {e}"
        ) from e
    return _C

