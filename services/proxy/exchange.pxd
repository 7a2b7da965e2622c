# Cython declarations for exchange.py (an "augmenting .pxd", see pipeline.pxd): Exchange is an
# extension type, its attributes C struct fields, its steps called through a C vtable.

cimport cython

from services.proxy.conn cimport Conn
from services.proxy.context cimport Limits
from services.proxy.http1 cimport RequestHead, ResponseHead, parse_response_head, render_response_head
from services.proxy.pipeline cimport Txn


cdef class Exchange:
    cdef public object client, upstream
    cdef public Limits limits
    cdef public RequestHead head
    cdef public Txn txn
    cdef public ResponseHead final
    cdef public object reused, state, client_keep, upstream_reusable, error, status
    cdef public object _body, _continued, _interim_seen, _owed, _reader, _body_sent, _body_bytes, _left
    cdef public Py_ssize_t _passed

    cpdef _setup(self, client, upstream, RequestHead head, Limits limits, Txn txn, reused)
    @cython.locals(transitions=dict, allowed=frozenset)
    cpdef _to(self, state)
    cpdef send(self, request, body=*)
    @cython.locals(resp=ResponseHead)
    cpdef bint step(self) except -1
    cpdef bint pump(self) except -1
    cpdef bint stalled(self) except -1
    cpdef _end(self)
    cpdef _interim(self, ResponseHead resp, n)
    cpdef _unanswered(self)
    cpdef _client_gone(self, when)
    cpdef _body_failure(self, exc)
    cpdef _fail(self, status, text, reason=*, client_fault=*)
    cpdef _send_head(self, ResponseHead resp)
    cpdef _done(self, ResponseHead resp)
    cpdef _cut_off(self, text)
    cpdef _mark(self)
    @cython.locals(passed=Py_ssize_t)
    cpdef _undelivered(self)
    cpdef bint client_left(self) except -1
    cpdef _client_event(self)

cpdef str upstream_version(RequestHead head)
@cython.locals(conn=Conn)
cpdef _write(stream, data)
@cython.locals(conn=Conn)
cpdef _buffer(stream)
cpdef _socket_of(stream)
@cython.locals(ex=Exchange)
cpdef Exchange new_exchange(client, upstream, RequestHead head, Limits limits, Txn txn, reused)
cpdef _counted(Exchange ex, sink, data)
