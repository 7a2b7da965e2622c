# Cython declarations for journal_applied.py (an "augmenting .pxd", see services/proxy/pipeline.pxd):
# the check that a batch's ids are one writer's run counts in C integers.

cimport cython

@cython.locals(expect=Py_ssize_t, s=Py_ssize_t)
cpdef _consecutive_pairs(list record_ids)
