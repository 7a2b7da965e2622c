# Cython declarations for redaction.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): the
# Redactor every transaction record goes through is an extension type, its caches typed dicts.

cimport cython


cdef class Redactor:
    cdef public object patterns, _ids, _exact, _glob
    cdef public dict _seen, _names, _bits, _fields, _varying
    cdef public list _last_lines, _last_pairs

    cpdef bint matches(self, name) except -1
    @cython.locals(bits=dict)
    cpdef tuple _name(self, name)
    @cython.locals(seen=dict, hit=tuple, got=tuple, pick=tuple, line=str, name=str, value=str, varying=dict, count=Py_ssize_t)
    cpdef tuple _field(self, field)
    @cython.locals(out=dict, seen=dict, values=list, got=tuple, key=str)
    cpdef dict header_lines(self, lines)
    @cython.locals(
        parts=list, seen=dict, got=tuple, pick=tuple, mask=Py_ssize_t, bit=Py_ssize_t, twice=bint, last=list,
        prev=tuple, entry=tuple, n=Py_ssize_t, i=Py_ssize_t,
    )
    cpdef tuple recorded(self, list fields)
    @cython.locals(out=dict, names=dict, values=list, hit=tuple, key=str)
    cpdef dict headers(self, pairs)
    cpdef url(self, url)


cpdef str _json_string(str value)
