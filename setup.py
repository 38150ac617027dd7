"""Build hook for the one C extension, ``xpuflow.policy._lexicon`` (the complexity scorer's word
lookups). It is optional: without a C compiler the install still succeeds and the scorer uses its
pure-Python path, which gives the same scores more slowly. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "xpuflow.policy._lexicon",
            ["src/xpuflow/policy/_lexicon.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
