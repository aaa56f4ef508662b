"""palm_fast's benchmark suite, installed as ``palm_fast.benchmarks``.

``harness.py`` holds the timing, peak measurement and JSON records; each
``bench_<op>.py`` registers its cases with ``@harness.register``. ``palm-fast
bench`` runs every registered case.
"""
