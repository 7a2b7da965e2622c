# Cython declarations for pool.py (an "augmenting .pxd", see pipeline.pxd): the pool is an extension
# type, and the connections it parks and hands out are read as conn.Conn's C structs.

cimport cython

from services.proxy.conn cimport Conn
from services.proxy.gate cimport Gate


cdef class UpstreamPool:
    cdef public object per_key, total, idle_timeout, _sweeper
    cdef public dict _idle
    cdef public Py_ssize_t _count, reused, parked
    cdef public object _last

    cpdef get(self, key, admission)
    @cython.locals(conn=Conn, q=object)
    cpdef take(self, tuple key, Gate gate)
    @cython.locals(idle=dict)
    cpdef put(self, key, Conn conn)
    cpdef _close_oldest(self, q)
    @cython.locals(idle=dict)
    cpdef _drop_oldest(self)
    cpdef _sweep(self)


cpdef bint usable(Conn conn) except -1
