# Cython declarations for metrics.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): a
# Histogram is an extension type, observed through a C vtable by the compiled modules that cimport
# it (the gate's decisions).

cdef class Histogram:
    cdef public tuple bounds
    cdef public list counts
    cdef public double sum, _first

    cpdef observe(self, double value)
