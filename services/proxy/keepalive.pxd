# Cython declarations for keepalive.py (an "augmenting .pxd", see pipeline.pxd): the request cycle is
# an extension type, its attributes C struct fields, its steps called through a C vtable, and the
# heads and exchanges it handles read as C structs.

cimport cython

from services.proxy.conn cimport Conn, FirstDeadlines
from services.proxy.context cimport ClientConn, Limits, ProxyContext
from services.proxy.exchange cimport Exchange, new_exchange
from services.proxy.gate cimport Gate, LiveConn, new_admission
from services.proxy.http1 cimport RequestHead
from services.proxy.mitm cimport Interceptor
from services.proxy.tunnel cimport Tunnel


cdef class Deadlines
cdef class _Looks


# Where the handler's coroutine takes over: made and filled in by the cycle's steps (C struct fields).
cdef class Handover:
    cdef public object kind, got, coro, waiting, prepared, verdict, exc
    cdef public RequestHead head
    cdef public Exchange exchange


cdef class KeptAlive:
    cdef public ClientConn client
    cdef public Conn upstream
    cdef public Limits limits
    cdef public object prepare, quick, admit, loop, state, identity
    cdef public Gate gate
    cdef public object key, cid, clean
    cdef public Exchange exchange
    cdef public RequestHead head
    cdef public object prepared, verdict, tunnel, look
    cdef public Tunnel looked
    cdef public object first, header_deadline, handed, _fut
    cdef public Deadlines deadlines
    cdef public object _deadline, _queue, _timeout

    @cython.locals(client=ClientConn)
    cpdef begin(self, identity)
    @cython.locals(q=dict)
    cpdef close(self)
    cpdef _unwatch(self)
    @cython.locals(client=ClientConn)
    cpdef _hand(self, Handover h)
    @cython.locals(client=ClientConn, upstream=Conn)
    cpdef _finish(self)
    @cython.locals(q=dict)
    cpdef _arm(self, timeout)
    cpdef _run(self, Exchange ex, int step)
    cpdef _hand_exchange(self, Exchange ex)
    @cython.locals(head=RequestHead, client=ClientConn, buf=bytearray)
    cpdef _next(self)
    @cython.locals(upstream=Conn)
    cpdef bint _servable(self, RequestHead head, buffered) except -1
    @cython.locals(client=ClientConn)
    cpdef bint _admissible(self, RequestHead head) except -1
    @cython.locals(upstream=Conn, lc=LiveConn)
    cpdef _request(self, RequestHead head)
    cpdef _connect(self, RequestHead head)
    @cython.locals(client=ClientConn, ctx=ProxyContext, head=RequestHead, tunnel=Tunnel)
    cpdef _connected(self, Conn up, failure)
    @cython.locals(tunnel=Tunnel, head=RequestHead, client=Conn, upstream=Conn, interceptor=Interceptor)
    cpdef _look(self, bint quiet_over)
    @cython.locals(looks=_Looks)
    cpdef _arm_look(self)
    @cython.locals(tunnel=Tunnel, looks=_Looks)
    cpdef _end_look(self)
    cpdef _join(self, Tunnel tunnel)


# The cycles' deadlines: one timer per timeout (a cycle's deadline fields read as C struct fields).
cdef class Deadlines:
    cdef public dict queues
    cdef public double t1, t2
    cdef public list e1, e2

    @cython.locals(entry=list, q=dict, old=dict, timed=bint, t=double)
    cpdef arm(self, KeptAlive cycle, timeout, double deadline=*)
    @cython.locals(cycle=KeptAlive, q=dict)
    cpdef _fire(self, list entry, loop)


# New tunnels' looks while nobody has spoken (conn.FirstDeadlines): a look's arm and end are C calls.
cdef class _Looks(FirstDeadlines):
    cpdef bint arm(self, KeptAlive cycle, timeout) except -1
    cpdef expire(self, cycle)


# What a rule change calls to end a tracked request's connections (`close_both`'s).
cdef class BothEnds:
    cdef public Conn client, upstream


@cython.locals(both=BothEnds)
cpdef close_both(Conn client, Conn upstream)
