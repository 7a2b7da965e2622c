# Cython declarations for redaction.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): the
# Redactor every transaction record goes through is an extension type, its caches typed dicts.

cimport cython


cdef class Redactor:
    cdef public object patterns, _exact, _glob
    cdef public dict _seen, _names, _lines

    cpdef bint matches(self, name) except -1
    cpdef tuple _name(self, name)
    @cython.locals(seen=dict, hit=tuple, got=tuple, pick=tuple, name=str, value=str)
    cpdef tuple _line(self, str line)
    @cython.locals(out=dict, seen=dict, values=list, line=str, got=tuple, key=str)
    cpdef dict header_lines(self, lines)
    @cython.locals(parts=list, keys=list, seen=dict, line=str, got=tuple, pick=tuple)
    cpdef tuple recorded_lines(self, list lines)
    @cython.locals(out=dict, names=dict, values=list, hit=tuple, key=str)
    cpdef dict headers(self, pairs)
    cpdef url(self, url)
