# Cython declarations for context.py (an "augmenting .pxd", see pipeline.pxd): the listeners' shared
# context and an accepted client connection (deriving from conn.Conn's type, conn.pxd) are extension
# types, their attributes C struct fields, their methods called through the C vtable. Keep the
# attribute lists equal to the classes' __slots__ (tests/unit/test_compiled.py checks). keepalive.pxd
# and tunnel.pxd cimport these, so context.py imports neither of those modules at its top.

cimport cython

from services.proxy.conn cimport Conn
from services.proxy.pool cimport UpstreamPool


# (a dataclass: Cython's, compiled; its fields read as C struct fields where a `Limits` is typed)
cdef class Limits:
    cdef public object header_timeout, connect_timeout, idle_timeout, max_header_bytes, max_headers
    cdef public object max_connections, max_per_client, upstream_pool_size, upstream_idle_timeout, half_closed_clients
    cdef public object workers, configured_max_connections, configured_max_per_client


cdef class ProxyContext:
    cdef public object gate
    cdef public Limits limits
    cdef public Py_ssize_t active
    cdef public dict per_client, refused
    cdef public object tunnel_hook, hooks, recorder
    cdef public UpstreamPool pool
    cdef public object docker, identities, deadlines, idle_sweeper, _refusal_logged, loop

    cpdef note_refusal(self, cap, identity)


cdef class ClientConn(Conn):
    cdef public object handler, begin, cycle
    cdef public ProxyContext ctx
    cdef public object task, src_ip, identity, claimed, identity_token
    cdef public bint over_cap, counted, detached
    cdef public object _gone_fut

    @cython.locals(cap=Py_ssize_t)
    cpdef connection_made(self, transport)
    cpdef start(self)
    cpdef claim(self, identity)
    cpdef _release(self)
    cpdef finish(self)
    cpdef gone(self)
    cpdef _left(self)
    cpdef eof_received(self)
    cpdef connection_lost(self, exc)


@cython.locals(names=dict, name=str)
cpdef str default_identity(ClientConn conn)
