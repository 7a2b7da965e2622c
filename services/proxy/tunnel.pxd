# Cython declarations for tunnel.py (an "augmenting .pxd", see pipeline.pxd): a tunnel is an extension
# type, its two connections read as conn.Conn's C structs (the client one is a context.ClientConn:
# context.py imports this module, so this one declares it as the Conn it derives from).

from services.proxy.conn cimport Conn


cdef class Tunnel:
    cdef public object ctx
    cdef public Conn client, upstream
    cdef public object cid, seen, since
    cdef public bint ended

    cpdef abort(self)
    cpdef _lost(self)
    cpdef end(self)
