"""Triton kernels with their torch references (installed as ``kvsurgery.kernels``).

Every module here is flat and imports its siblings as ``from .name import x`` only, so
that ``kvsurgery export`` can copy it next to the exported modeling file. Triton is
imported lazily (inside ``try``): the references run wherever torch does.
"""
