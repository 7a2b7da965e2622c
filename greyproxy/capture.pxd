# Cython declarations for capture.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): a
# request's and a response's BodyCapture are extension types, read as C structs by the Txn.

cdef class BodyCapture:
    cdef public object limit, size, data
