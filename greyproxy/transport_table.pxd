# Cython declarations for transport_table.py (an "augmenting .pxd", see services/proxy/pipeline.pxd):
# the table an extension type, so that uvloop's `self._transports[fd] = transport` and its lookup
# are C slot calls (mp_ass_subscript, mp_subscript) rather than Python methods.

cdef class TransportTable:
    cdef public dict _refs
