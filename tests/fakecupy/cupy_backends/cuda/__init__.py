"""Part of the CuPy stand-in (see tests/fakecupy/cupy/__init__.py)."""
