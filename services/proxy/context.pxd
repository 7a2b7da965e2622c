# Cython declarations for context.py (an "augmenting .pxd", see pipeline.pxd): an accepted client
# connection is an extension type deriving from conn.Conn's (conn.pxd), its attributes C struct
# fields, its callbacks called through the C vtable. Keep the attribute lists equal to ClientConn's
# __slots__ (tests/unit/test_compiled.py checks).

from services.proxy.conn cimport Conn


cdef class ClientConn(Conn):
    cdef public object handler, begin, cycle, ctx, task, src_ip, identity, claimed, identity_token
    cdef public bint over_cap, counted, detached
    cdef public object _gone_fut

    cpdef connection_made(self, transport)
    cpdef start(self)
    cpdef claim(self, identity)
    cpdef _release(self)
    cpdef finish(self)
    cpdef gone(self)
    cpdef _left(self)
    cpdef eof_received(self)
    cpdef connection_lost(self, exc)
