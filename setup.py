"""Build script.

A plain ``pip install .`` needs no GPU and no CUDA toolkit: the Triton kernels compile
just in time and the CUDA decode kernels in ``csrc/`` are built on first use with ninja.
"""
from setuptools import setup

setup()
