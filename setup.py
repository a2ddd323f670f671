"""Build the optional C accelerator of the trace parser; everything else is in setup.cfg.

``optional=True``: where no C compiler or Python headers exist, the install still succeeds and
``gtp5g_op.trace.parser`` uses its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gtp5g_op.trace._fastscan",
            sources=["src/gtp5g_op/trace/_fastscan.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
