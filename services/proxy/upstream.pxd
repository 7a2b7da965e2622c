# Cython declarations for upstream.py (an "augmenting .pxd", see pipeline.pxd): a connect driven from
# callbacks (`Connecting`, one per new CONNECT tunnel) is an extension type, its attributes C struct
# fields, its steps called through a C vtable. Keep the attribute lists equal to its __slots__
# (tests/unit/test_compiled.py checks).

cimport cython

from services.proxy.conn cimport Conn, ConnectWaiter, FirstDeadlines, PipeConn


cdef class _ConnectDeadlines


cdef class Connecting(ConnectWaiter):
    cdef public object loop, host, port, addrs
    cdef public Py_ssize_t i
    cdef public double deadline
    cdef public object guard, done, coro, fut, timer
    cdef public bint fired, cached, made
    cdef public PipeConn conn

    cpdef bint start(self) except -1
    @cython.locals(deadlines=_ConnectDeadlines)
    cpdef _try(self)
    @cython.locals(deadlines=_ConnectDeadlines)
    cpdef _disarm(self)
    @cython.locals(connected=bint)
    cpdef _step(self, _fut)
    cpdef _expire(self)
    cpdef _made(self, PipeConn conn)
    cpdef _finish(self)


cpdef _literal(str host, port)
@cython.locals(octets=int, value=int, ch=Py_UCS4)
cpdef bint _ipv4(str host) except -1


# The connects' deadlines on one timer (conn.FirstDeadlines): a connect's arm and disarm are C calls.
cdef class _ConnectDeadlines(FirstDeadlines):
    cpdef bint arm(self, Connecting c) except -1
    cpdef expire(self, c)
