# Cython declarations for records.py (an "augmenting .pxd", see services/proxy/pipeline.pxd): the
# record builders the proxy calls per request are C functions too (`log_values` called through C by
# the gate, which cimports it; `ms3` by `log_values`).

cpdef ms3(ms)
cpdef list log_values(container, host, port, method, result, resolved_hostname=*, rule_id=*, rule_summary=*, response_time_ms=*, reason=*, mitm_skip_reason=*, container_id=*, timestamp=*)
