# Cython declarations for records.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): the
# record builders the proxy calls per request are C functions too (`log_values` called through C by
# the gate, which cimports it; `ms3` by `log_values` and by the pipeline, which cimports it too).

cimport cython

# (a C double in and out: the callers' C calls pass and take no float object)
@cython.locals(k="long long")
cpdef double ms3(double ms)
cpdef list log_values(container, host, port, method, result, resolved_hostname=*, rule_id=*, rule_summary=*, response_time_ms=*, reason=*, mitm_skip_reason=*, container_id=*, timestamp=*)
