# Cython declarations for pipeline.py (an "augmenting .pxd": Python never reads it; setup.py compiles
# pipeline.py with it, greyproxy/compiled.py). Recorder and Txn become extension types: their
# attributes are C struct fields (read and set without a dictionary lookup in the compiled modules
# that cimport them), their cpdef methods are called through a C vtable. Every attribute is `public`:
# Python code and the tests read and set them as before. Keep the attribute lists equal to the
# classes' __slots__ (tests/unit/test_compiled.py checks).

cimport cython

from bus.records cimport ms3
from greyproxy.capture cimport BodyCapture
from greyproxy.redaction cimport Redactor
from services.proxy.hooks cimport Flow
from services.proxy.http1 cimport RequestHead, ResponseHead


cdef class Txn


cdef class Recorder:
    cdef public object journal, max_body, counts, transactions
    cdef public Redactor redactor

    @cython.locals(redactor=Redactor)
    cpdef tuple head_facts(self, ResponseHead resp)
    @cython.locals(t=Txn)
    cpdef Txn txn(self, container, origin, host, port, RequestHead head, rule_id=*, host_mismatch=*)
    cpdef submit(self, list values, tuple req, tuple resp, scrub=*)


cdef class Txn:
    cdef public Recorder recorder
    cdef public object container, host, port, method, url, request_headers, request_host, host_mismatch
    cdef public object req_ct, req_ce, t0, p0, rule_id, substituted, done
    cdef public ResponseHead resp_head
    cdef public tuple resp_facts
    cdef public BodyCapture req, resp
    cdef public object session_id, scrubber, refused

    cpdef _start(self, Recorder recorder, container, origin, host, port, RequestHead head, rule_id, host_mismatch)
    cpdef _capture(self, content_type)
    cpdef req_sink(self)
    cpdef resp_sink(self, ResponseHead resp)
    @cython.locals(f=Flow)
    cpdef credentials_from(self, flow)
    @cython.locals(facts=tuple)
    cpdef finish(self, ResponseHead resp=*, status=*, result=*, error=*, block_reason=*)


cpdef _remembered(dict known, key, compute, Py_ssize_t bound)
cpdef _dest_host(host)
@cython.locals(text=bytes)
cpdef str _fields_text(dict fields)
cpdef bint _text_like(content_type) except -1
@cython.locals(text=bytes)
cpdef str _labels_text(labels)
