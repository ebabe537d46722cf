"""Build script. Pure Python for now; the native extension (csrc/) plugs in here later.

Install for development with ``pip install -e . --no-build-isolation`` so the
build sees the torch already installed.
"""

from setuptools import setup

setup()
