# Cython declarations for keepalive.py (an "augmenting .pxd", see pipeline.pxd): the request cycle is
# an extension type, its attributes C struct fields, its steps called through a C vtable, and the
# heads and exchanges it handles read as C structs.

cimport cython

from services.proxy.exchange cimport Exchange
from services.proxy.http1 cimport RequestHead


cdef class KeptAlive:
    cdef public object client, limits, prepare, quick, admit, gate, loop, state, identity, upstream
    cdef public object key, cid, clean
    cdef public Exchange exchange
    cdef public RequestHead head
    cdef public object prepared, verdict, tunnel, first, header_deadline, handed, _fut, deadlines
    cdef public object _deadline, _queue, _timeout

    cpdef _unwatch(self)
    cpdef _hand(self, h)
    cpdef _arm(self, timeout)
    cpdef _run(self, Exchange ex, step)
    cpdef _hand_exchange(self, Exchange ex)
    @cython.locals(head=RequestHead)
    cpdef _next(self)
    cpdef bint _servable(self, RequestHead head, buffered) except -1
    cpdef bint _admissible(self, RequestHead head) except -1
    cpdef _request(self, RequestHead head)
