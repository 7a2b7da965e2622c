# Cython declarations for tunnel.py (an "augmenting .pxd", see pipeline.pxd): a tunnel is an extension
# type, its context and two connections read as C structs (context.pxd, conn.pxd; the client one is a
# context.ClientConn, declared as the Conn it derives from: the tests build tunnels of plain Conns;
# `join` and `end`, which only a ClientConn's tunnel reaches, read it as one).

cimport cython

from services.proxy.conn cimport Conn, splice
from services.proxy.context cimport ClientConn, ProxyContext
from services.proxy.gate cimport Gate


cdef class IdleSweeper


cdef class Tunnel:
    cdef public ProxyContext ctx
    cdef public Conn client, upstream
    cdef public object cid, seen, since
    cdef public bint ended

    @cython.locals(gate=Gate)
    cpdef track(self, container, host, port, verdict)
    @cython.locals(sweeper=IdleSweeper, client=ClientConn)
    cpdef join(self)
    cpdef abort(self)
    cpdef _lost(self)
    @cython.locals(sweeper=IdleSweeper, gate=Gate, client=ClientConn)
    cpdef end(self)


# One timer for the idle spliced tunnels (a tunnel's add and discard: C calls).
cdef class IdleSweeper:
    cdef public double idle, step
    cdef public dict tunnels
    cdef public object _timer, _loop

    cpdef add(self, Tunnel tunnel)
    cpdef discard(self, Tunnel tunnel)
    @cython.locals(t=Tunnel)
    cpdef _sweep(self)
    cpdef close(self)
