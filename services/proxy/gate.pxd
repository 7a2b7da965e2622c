# Cython declarations for gate.py (an "augmenting .pxd", see pipeline.pxd): a Verdict (one per
# request) is an extension type, Cython's dataclass (its __init__ compiled, not the interpreted one
# dataclasses writes).

cdef class Verdict:
    cdef public object allowed, reason, rule_id, resolved_hostname, elapsed_ms, log_pending
