# Cython declarations for http1.py (an "augmenting .pxd", see pipeline.pxd): the request and response
# heads are extension types (Cython's dataclass: the same __init__, repr, eq, fields() and replace()),
# their fields C struct fields read directly by the compiled modules that cimport them.

cdef class RequestHead:
    cdef public object method, target, version, headers, host, port, scheme, path, keep_alive, chunked
    cdef public object content_length, expect_continue, upgrade, proxy_user, proxy_password, authority
    cdef public object names, placeholder_free, parsed

    cpdef header(self, name)
    cpdef render_upstream(self, version)
    cpdef upstream_headers(self)


cdef class ResponseHead:
    cdef public object version, status, reason, _headers, keep_alive, chunked, content_length, has_body
    cdef public object until_close, raw, raw_keep_alive, index, text, lower

    cpdef field_lines(self)
    cpdef header(self, name)
