# Cython declarations for apply.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): a log
# row's column places are C integers (an index that is a Python int costs a conversion per look).

cimport cython

cdef Py_ssize_t _L_TS, _L_CID, _L_NAME, _L_RESULT, _N_LOG, _L_SUMMARY

@cython.locals(n=Py_ssize_t)
cpdef _log_params(data, now)

@cython.locals(n=Py_ssize_t, c=Py_ssize_t)
cpdef tuple _shared(list rows, Py_ssize_t ncols=*)
