# Cython declarations for tunnel.py (an "augmenting .pxd", see pipeline.pxd): a tunnel is an extension
# type, its context and two connections read as C structs (context.pxd, conn.pxd; the client one is a
# context.ClientConn, declared as the Conn it derives from: the tests build tunnels of plain Conns).

from services.proxy.conn cimport Conn
from services.proxy.context cimport ProxyContext


cdef class Tunnel:
    cdef public ProxyContext ctx
    cdef public Conn client, upstream
    cdef public object cid, seen, since
    cdef public bint ended

    cpdef track(self, container, host, port, verdict)
    cpdef join(self)
    cpdef abort(self)
    cpdef _lost(self)
    cpdef end(self)
