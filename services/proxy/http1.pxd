# Cython declarations for http1.py (an "augmenting .pxd", see pipeline.pxd): the request and response
# heads are extension types (Cython's dataclass: the same __init__, repr, eq, fields() and replace()),
# their fields C struct fields read directly by the compiled modules that cimport them.

cimport cython

cdef class RequestHead:
    cdef public object method, target, version, headers, host, port, scheme, path, keep_alive, chunked
    cdef public object content_length, expect_continue, upgrade, proxy_user, proxy_password, authority
    cdef public object names, placeholder_free, parsed

    cpdef header(self, name)
    @cython.locals(last=tuple, headers=list)
    cpdef render_upstream(self, version)
    @cython.locals(out=list, k=str, v=str, kv=tuple, tokens=list, n=Py_ssize_t, headers=list)
    cpdef _render_parsed(self, version)
    @cython.locals(kept=list, out=list, kv=tuple, k=str)
    cpdef upstream_headers(self)


cdef class ResponseHead:
    cdef public object version, status, reason, _headers, keep_alive, chunked, content_length, has_body
    cdef public object until_close, raw, raw_keep_alive, index, text, lower, connection_at, lines

    @cython.locals(text=str)
    cpdef field_lines(self)
    @cython.locals(lower=str, text=str, needle=str, i=Py_ssize_t, start=Py_ssize_t, stop=Py_ssize_t, needles=dict, value=str)
    cpdef header(self, name)


# The parsers' callback target for a head read by splitting it (one per parse: cheap as an extension type).
cdef class _HeadEnd:
    cdef public bint complete


# The request parser's locals typed (C calls for the bytes/str/list methods; `buf` must be bytes).
@cython.locals(
    start=Py_ssize_t, end=Py_ssize_t, consumed=Py_ssize_t, line_end=Py_ssize_t, head_bytes=bytes,
    lines=list, request_line=list, version=str, method=str, target=str, headers=list, raw_names=list,
    line=str, k=str, v=str, head=RequestHead, text=str, first_line=str, pair=tuple, pool=list, done=_HeadEnd, kept=tuple,
    colon=Py_ssize_t, parts=tuple, last=tuple, facts=int, stop=Py_ssize_t,
)
cpdef parse_request_head(bytes buf, max_header_bytes=*, max_headers=*, origin=*)



# The response parser's locals typed (as the request's; no generator expression in it: a cpdef
# function takes no closure).
@cython.locals(end=Py_ssize_t)
cpdef parse_response_head(bytes buf, max_header_bytes=*, request_method=*)
@cython.locals(
    consumed=Py_ssize_t, whole=str, first=Py_ssize_t, line_end=Py_ssize_t, space=Py_ssize_t, text=str,
    head_bytes=bytes, status=Py_ssize_t,
    version=str, te=list, cls=list, connection=list, lower=str, reason=str, lk=str, start=Py_ssize_t,
    stop=Py_ssize_t, value=str, method=str, head=ResponseHead, size=Py_ssize_t, kind=int, connection_at=Py_ssize_t,
    lines=list, line=str, pos=Py_ssize_t,
)
cpdef tuple _response_head(bytes buf, Py_ssize_t end, str request_method, bint plain)
cdef inline bint _tchar(unsigned char c)
@cython.locals(c="unsigned char", state=int, i=Py_ssize_t, n=Py_ssize_t, stop=Py_ssize_t, at="const unsigned char *")
cpdef Py_ssize_t _plain_end(bytes buf, Py_ssize_t max_header_bytes) except -2


# The parsers' helpers: C calls from them (cpdef: still callable from Python, as the tests do).
@cython.locals(end=Py_ssize_t, c=Py_UCS4)
cpdef str _value_at(str line, Py_ssize_t start)
@cython.locals(token=str)
cpdef list _split_tokens(str value)
cpdef bint _keep_alive(str version, list connection)
@cython.locals(c=Py_UCS4)
cpdef bint _content_length_ok(str value)
@cython.locals(c=Py_UCS4, n=Py_ssize_t)
cpdef Py_ssize_t _content_length_value(str value) except? -2
@cython.locals(length=Py_ssize_t)
cpdef tuple _framing_of(list te, bint has_te, list cls, err)
cpdef _run_parser(parser, bytes data)

@cython.locals(end=Py_ssize_t)
cpdef bint _at(str text, Py_ssize_t start, str word, str usual) except -1
@cython.locals(c=Py_UCS4)
cpdef int _response_field(str text, Py_ssize_t start) except -1

@cython.locals(start=Py_ssize_t, end=Py_ssize_t, stop=Py_ssize_t, scheme=str, authority=str, rest=str, path=str, hit=tuple)
cpdef tuple _target_parts(str method, str target)
@cython.locals(stop=Py_ssize_t, path=str, value=str, kv=tuple, k=str, hit=tuple, got=tuple)
cpdef tuple _origin_parts(str method, str target, str version, list headers, names, str scheme, str host, port)
@cython.locals(tokens=list, kv=tuple, k=str)
cpdef _derive_request_headers(RequestHead head, bint none_derived=*)
@cython.locals(facts=int)
cpdef int _names_facts(frozenset names) except -1
@cython.locals(n=Py_ssize_t, i=Py_ssize_t, c="unsigned char", at="const unsigned char *")
cpdef Py_ssize_t _head_end(bytes buf, Py_ssize_t start, Py_ssize_t stop) except -2

# The field helpers of heads (C calls from their methods).
cpdef _add_tokens(list tokens, str value)
@cython.locals(k=str, out=list)
cpdef list _tokens(headers, str name, names=*)
cpdef _first(headers, str name, names=*)
@cython.locals(t=str)
cpdef bint _names_dropped(frozenset names, list tokens) except -1
@cython.locals(n=str)
cpdef bint _proxy_names(names)
@cython.locals(k=str, lk=str, kept=list, tokens=list, out=list)
cpdef list _filter_hop_by_hop(headers, bint keep_upgrade, names=*)
@cython.locals(raw=bytes, i=Py_ssize_t)
cpdef bytes render_response_head(ResponseHead resp, bint keep_alive, body=*)
