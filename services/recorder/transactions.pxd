# Cython declarations for transactions.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): a
# row's column places are C integers and `_params` indexes its list with them directly (an index
# that is a Python int costs a conversion per look, ~40 instructions, some 60 of them per row).

cimport cython

cdef Py_ssize_t _TS, _RESULT, _MISMATCH, _BLOCK, _N, _REQ_BODY, _RESP_BODY

@cython.locals(p=list, n=Py_ssize_t, i=Py_ssize_t, body=Py_ssize_t, codec=Py_ssize_t, charset=Py_ssize_t)
cpdef list _params(data, now)
