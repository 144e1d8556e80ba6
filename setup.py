"""The build of lunamon's one compiled module; everything else is in setup.cfg.

``lunamon._speedups`` (the line-protocol encoder in C) is optional: where it
cannot be compiled, the install goes on and lunamon uses its pure-Python
encoder, which gives the same bytes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("lunamon._speedups", ["lunamon/_speedups.c"], optional=True),
    ]
)
