# Cython declarations for journal.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): the
# JournalWriter every record of the proxy is appended to is an extension type, its attributes C
# struct fields (its counters C integers). Keep the attribute list equal to the class's __slots__
# (tests/unit/test_compiled.py checks). Its methods are plain Python methods but `append` and the
# two it calls: a test can still replace one on an instance of a Python subclass.

cimport cython


cdef class JournalWriter:
    cdef public object endpoint, ack_timeout, _ctx, _batch_ids, _queue, _idle
    cdef public Py_ssize_t outbox_limit, outbox_bytes, batch_size, batch_bytes, window
    cdef public str _prefix
    cdef public Py_ssize_t _seq, _queued_bytes, _inflight_count, _inflight_bytes, _runs
    cdef public dict _inflight
    cdef public bint _idle_set, _urgent
    cdef public object _sock, _owner, _fd, _loop, _timer, _soon, _ack_wait, _unsent_since
    cdef public Py_ssize_t dropped, acked, resent, sends

    @cython.locals(enc=bytes, size=Py_ssize_t)
    cpdef append(self, kind, data, record_id=*)
    cpdef _schedule(self)
    @cython.locals(count=Py_ssize_t, size=Py_ssize_t)
    cpdef bint _over(self, Py_ssize_t extra) except -1


@cython.locals(i=Py_ssize_t, rec=list, out=list)
cpdef tuple decode_batch(body)
