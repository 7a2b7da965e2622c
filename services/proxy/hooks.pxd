# Cython declarations for hooks.py (an "augmenting .pxd", see pipeline.pxd): a request's Flow is an
# extension type, its attributes C struct fields, the client's head read as a C struct.

cimport cython

from services.proxy.http1 cimport RequestHead


cdef class Flow:
    cdef public object claimed, counted, container, scheme, host, port, server_name
    cdef public RequestHead head
    cdef public object verdict, substituted, session_id, scrubber, refused_labels, _headers, _target

    cpdef _setup(self, container, scheme, host, port, RequestHead head, verdict, server_name, claimed)
    cpdef upstream_headers(self)
    cpdef _own(self)
    cpdef render(self, version)


@cython.locals(head=RequestHead)
cpdef bint _nothing_to_find(Flow flow) except -1

@cython.locals(flow=Flow)
cpdef Flow new_flow(container, scheme, host, port, RequestHead head, verdict, server_name, claimed)


# The request hooks' chain (an extension type: its `run` a C call from the request steps, which
# skips the built-in hooks' calls where their first test passes the request).
cdef class HookChain:
    cdef public object hooks, refused

    @cython.locals(i=Py_ssize_t)
    cpdef run(self, Flow flow)
