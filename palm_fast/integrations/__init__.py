"""Replacement factories ``palm_fast.patch`` knows out of the box.

* ``reference``: palm_fast's own reference modules (``palm_fast.reference``).
* ``palm_pytorch``: the public PaLM-pytorch 0.2.2 package (imported only when a model built
  from it is patched; palm_fast does not depend on it).
"""
