"""Build hook for the C extensions: ``xpuflow.policy._lexicon`` (the complexity scorer's word lookups)
and ``xpuflow.policy._snapshot_table`` (worker snapshots as columns, scored by the worker scorer's
rules). Both are optional: without a C compiler the install still succeeds and each user takes its
pure-Python path, which gives the same results more slowly. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "xpuflow.policy._lexicon",
            ["src/xpuflow/policy/_lexicon.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "xpuflow.policy._snapshot_table",
            ["src/xpuflow/policy/_snapshot_table.c"],
            # no fused multiply-add: every result must round as the Python code it mirrors does
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        ),
    ]
)
