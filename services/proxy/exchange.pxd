# Cython declarations for exchange.py (an "augmenting .pxd", see pipeline.pxd): Exchange is an
# extension type, its attributes C struct fields, its steps called through a C vtable.

from services.proxy.pipeline cimport Txn


cdef class Exchange:
    cdef public object client, upstream, head, limits
    cdef public Txn txn
    cdef public object reused, state, client_keep, upstream_reusable, error, final, status
    cdef public object _body, _continued, _interim_seen, _owed, _reader, _body_sent, _body_bytes

    cpdef _to(self, state)
    cpdef bint step(self) except -1
    cpdef bint pump(self) except -1
    cpdef bint stalled(self) except -1
    cpdef _end(self)
    cpdef _interim(self, resp, n)
    cpdef _unanswered(self)
    cpdef _client_gone(self, when)
    cpdef _body_failure(self, exc)
    cpdef _fail(self, status, text, reason=*, client_fault=*)
    cpdef _send_head(self, resp)
    cpdef _done(self, resp)
    cpdef _cut_off(self, text)
