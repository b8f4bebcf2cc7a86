"""The compiled hot path (cdc_daemon/source/_hotpath.c), built at install with the system's C
compiler. Optional: without a compiler or Python's headers the install still succeeds and the
daemon runs the pure-Python path (it says which at start). Everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cdc_daemon.source._hotpath",
            ["cdc_daemon/source/_hotpath.c"],
            extra_compile_args=["-O2"],
            # A failed build (no compiler, no Python.h) leaves the module out, not the install.
            optional=True,
        )
    ]
)
