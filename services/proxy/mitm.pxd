# Cython declarations for mitm.py (an "augmenting .pxd", see pipeline.pxd): the tunnel hook is an
# extension type, so the look at a new tunnel's first bytes (`first_look`, from the request cycle's
# callbacks, keepalive.py) calls its steps through a C vtable and reads the connections (conn.pxd)
# and the gate (gate.pxd) as C structs. Keep the attribute list equal to Interceptor's __slots__
# (tests/unit/test_compiled.py checks).

cimport cython

from services.proxy.conn cimport Conn
from services.proxy.gate cimport Gate, Verdict


cdef class Interceptor:
    cdef public Gate gate
    cdef public object recorder, certs, bypass, upstream_ctx
    cdef public bint mitm_enabled
    cdef public dict counts
    cdef public object _mismatch_logged, _quiet
    cdef public dict _sessions

    @cython.locals(kind=str)
    cpdef first_look(self, Conn client, Conn upstream, host, Verdict verdict, bint quiet_over=*)
    cpdef _skip_reason(self, kind, hello, host)
    @cython.locals(counts=dict)
    cpdef _count(self, what)
    cpdef bint _skip(self, Verdict verdict, reason) except -1


@cython.locals(got=int)
cpdef str http_state(buf)
@cython.locals(n=Py_ssize_t, limit=Py_ssize_t, i=Py_ssize_t, start=Py_ssize_t, c=int, upper=bint, m=Py_ssize_t, end=Py_ssize_t, t=Py_ssize_t, j=Py_ssize_t)
cpdef int _request_line(bytearray buf) except -2
cpdef tuple _classify(buf)
