# Cython declarations for httpio.py (an "augmenting .pxd", see pipeline.pxd): a CONNECT head's look-up
# in the parsed heads (`parse_head`, every new tunnel's) with C calls: the head read as bytes, the
# cache as a dict, its entry as a tuple.

cimport cython


@cython.locals(heads=dict, hit=tuple)
cpdef parse_head(bytes buf, limits)
