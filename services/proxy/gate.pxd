# Cython declarations for gate.py (an "augmenting .pxd", see pipeline.pxd): the gate, its silent
# mode and its verdicts are extension types, their attributes C struct fields, the steps of a
# decision and of its log record called through a C vtable.

cimport cython

from bus.records cimport log_values
from greyproxy.metrics cimport Histogram


cdef class Admission
cdef class LiveConn


cdef class Verdict:
    cdef public object allowed, reason, rule_id, resolved_hostname, elapsed_ms, log_pending


cdef class SilentMode:
    cdef public object mode, expires_at, _timer

    cpdef active_mode(self, now=*)


cdef class Gate:
    cdef public object journal, publisher, _rules
    cdef public dict _decisions, _verdicts
    cdef public object rules_version, guard_ports, own_ports, local_hosts, hold_timeout, max_pending
    cdef public object pending_count, pending_admitted, pending_lookup, _pending_lock
    cdef public dict _pending_recent
    cdef public SilentMode silent
    cdef public object announce_silent
    cdef public dict holds, live
    cdef public object _live_ids
    cdef public dict _hits, _summaries, names, _addresses, container_ids
    cdef public Py_ssize_t decisions, allowed_count, blocked_count
    cdef public Histogram decision_seconds, hold_seconds
    cdef public object defer_tunnel_logs, name_hook, name_grace
    cdef public object _name_waits
    cdef public dict _unnamed_gone

    cpdef resolved_name(self, host)
    cpdef is_own_listener(self, host, port)
    cpdef admit_now(self, container, host, port, method, client_gone=*)
    @cython.locals(hit=tuple, key=tuple, cached=Verdict)
    cpdef _decide(self, t0, container, host, port, method, client_gone)
    cpdef Verdict _decided(self, t0, container, host, port, method, Verdict verdict, now=*)
    cpdef _address_rules_apply(self, container, port)
    cpdef bint keeps(self, container, port, conn)
    cpdef guard(self, ip, port, Admission adm)
    cpdef finish_log(self, Verdict verdict, mitm_skip_reason=*)
    @cython.locals(hit=tuple, key=tuple)
    cpdef Verdict check_request(self, container, host, port, counted=*)
    @cython.locals(hit=tuple)
    cpdef tuple _kept(self, key, now, bint count=*)
    cpdef _verdict(self, j, resolved=*, bint count=*)
    cpdef _remember(self, key, j)
    cpdef _decide_rules(self, container, host, port, resolved)
    @cython.locals(lc=LiveConn)
    cpdef track(self, container, host, port, Verdict verdict, close)
    cpdef untrack(self, cid)
    @cython.locals(h=list)
    cpdef _hit(self, rule_id, now=*)
    cpdef record(self, container, host, port, method, Verdict verdict, mitm_skip_reason=*, now=*)


@cython.locals(hosts=dict)
cpdef _normalise_host(host)
@cython.locals(v=Verdict)
cdef Verdict _new_verdict(allowed, reason, rule_id, resolved)


cdef class Admission:
    cdef public Gate gate
    cdef public object container, host, port, method
    cdef public Verdict verdict


@cython.locals(a=Admission)
cpdef Admission new_admission(Gate gate, container, host, port, method, Verdict verdict)


cdef class LiveConn:
    cdef public object container, host, port, resolved, rule_id, close
