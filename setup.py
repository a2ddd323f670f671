"""Build the optional C accelerators (trace parser, ring-buffer decoder); everything else is in setup.cfg.

``optional=True``: where no C compiler or Python headers exist, the install still succeeds and
``gtp5g_op.trace.parser`` and ``gtp5g_op.trace.rawbuf`` use their pure-Python paths.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gtp5g_op.trace._fastscan",
            sources=["src/gtp5g_op/trace/_fastscan.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "gtp5g_op.trace._rawbuf",
            sources=["src/gtp5g_op/trace/_rawbuf.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
