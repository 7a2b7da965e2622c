# Cython declarations for conn.py (an "augmenting .pxd", see pipeline.pxd): a connection is an
# extension type, its attributes C struct fields (read directly by the compiled modules that cimport
# it), its transport callbacks and steps called through a C vtable. uvloop takes it for a buffered
# protocol by its `get_buffer` (duck typing: it is not an asyncio.Protocol); see Conn's docstring.
# Keep the attribute lists equal to Conn's __slots__ (tests/unit/test_compiled.py checks).

cimport cython

cdef class Received:
    cdef public Py_ssize_t client, upstream

    cpdef add(self, bint client_side, Py_ssize_t n)
    cpdef dict snapshot(self)


cdef class Conn:
    cdef public bint client_side
    cdef public object transport
    cdef public bytearray buf
    cdef public bint eof, closed, _reading_paused
    cdef public Conn peer
    cdef public object _waiter, _drain, on_close, _closed_fut
    cdef public Py_ssize_t bytes_in, _fd
    cdef public object _deadline, _timer, _timed, _loop, watcher

    cpdef _setup(self)
    cpdef connection_made(self, transport)
    cpdef _send(self, data, Py_ssize_t n)
    @cython.locals(received=Received, n=Py_ssize_t)
    cpdef data_received(self, data)
    cpdef eof_received(self)
    cpdef connection_lost(self, exc)
    cpdef pause_writing(self)
    cpdef resume_writing(self)
    cpdef _wake(self)
    cpdef resume_reading(self)
    cpdef _bind_loop(self)
    cpdef _on_timer(self)
    cpdef take(self, n=*)
    cpdef write(self, data)
    cpdef close(self)
    cpdef abort(self)
    cpdef pipe_to(self, Conn peer)
    cpdef peername(self)


# A tunnel's upstream: a plain protocol until it reads a bulk transfer (then its BulkReads is).
cdef class BulkReads
cdef class PipeConn


# What made a PipeConn and waits for it (upstream.Connecting derives from it): C calls from the connection.
cdef class ConnectWaiter:
    cpdef _made(self, PipeConn conn)
    cpdef _finish(self)


cdef class PipeConn(Conn):
    cdef public ConnectWaiter connecting
    cdef public BulkReads bulk

    @cython.locals(c=ConnectWaiter)
    cpdef connection_made(self, transport)
    @cython.locals(c=ConnectWaiter)
    cpdef _connect_over(self)
    cpdef data_received(self, data)
    cpdef _to_bulk(self)
    cpdef eof_received(self)
    cpdef connection_lost(self, exc)


# A bulk transfer's reads (a buffered protocol: into the scratch, from there to the peer).
cdef class BulkReads:
    cdef public PipeConn conn

    cpdef connection_made(self, transport)
    cpdef get_buffer(self, sizehint)
    @cython.locals(conn=PipeConn, peer=Conn, received=Received)
    cpdef buffer_updated(self, Py_ssize_t nbytes)
    cpdef data_received(self, data)
    cpdef eof_received(self)
    cpdef connection_lost(self, exc)
    cpdef pause_writing(self)
    cpdef resume_writing(self)


cpdef Py_ssize_t _fileno(transport) except? -3
cpdef _expire(fut)
@cython.locals(c=Conn)
cpdef _finish_tunnel(Conn a, Conn b)
cpdef splice(Conn a, Conn b)
@cython.locals(c=Conn)
cpdef _either_start(Conn a, Conn b, timeout)
cpdef _either_end(Conn a, Conn b, fut, own)


# Deadlines served by one timer (a subclass's queue: upstream._ConnectDeadlines, mitm.QuietLooks, keepalive._Looks).
cdef class FirstDeadlines:
    cdef public dict waiting
    cdef public object timer, loop
    cdef public double last

    cpdef bint in_order(self, waiter, double deadline) except -1
    cpdef bint queue(self, waiter, loop, double deadline) except -1
    cpdef expire(self, waiter)
    @cython.locals(waiting=dict, now=double)
    cpdef _fire(self, loop)
