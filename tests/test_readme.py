"""The README's Python examples run as written (in order, sharing one namespace, as a reader
would paste them), so the usage section cannot drift from the API."""
from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    pytest.importorskip("palm_pytorch", reason="the patch example uses PaLM-pytorch (test extra)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 8
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
