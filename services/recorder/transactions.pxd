# Cython declarations for transactions.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): a
# row's column places are C integers and `_params` indexes its list with them directly (an index
# that is a Python int costs a conversion per look, ~40 instructions, dozens of them per row).

cimport cython

cdef Py_ssize_t _TS, _RESULT, _MISMATCH, _BLOCK, _N, _CONTAINER, _METHOD, _URL, _PORT, _HOST
cdef Py_ssize_t _REQ_BODY, _REQ_CODEC, _REQ_CHARSET, _REQ_SIZE, _RESP_BODY, _RESP_CODEC, _RESP_CHARSET, _RESP_SIZE
cdef Py_ssize_t _REQ_HEADERS, _RESP_HEADERS, _SUBSTITUTED, _REFUSED

@cython.locals(p=list, n=Py_ssize_t, i=Py_ssize_t)
cpdef list _params(data, now)
