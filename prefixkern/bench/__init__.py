"""prefixkern's benchmark suite: ``prefixkern-bench`` (or ``python -m prefixkern.bench``).

On a GPU it times every suite against its baselines in one process (per ``BENCHMARKS.md``),
checks each prefixkern result against the reference in the same run, and writes
``<date>_<gpu>.json``, a Markdown table and PNG plots. On a CPU it runs a small correctness demo
of the same pipeline through Triton's interpreter and reports no speed figures.
"""
