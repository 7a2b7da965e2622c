# Cython declarations for http_proxy.py (an "augmenting .pxd", see pipeline.pxd): the request steps
# (`prepare`, `admit_connect`) read the head, the verdict, the flow and the record as C structs and
# call one another, and the gate's decision, through C.

cimport cython

from services.proxy.context cimport ClientConn, default_identity
from services.proxy.exchange cimport upstream_version
from services.proxy.gate cimport Gate, Verdict
from services.proxy.hooks cimport Flow, HookChain, new_flow
from services.proxy.http1 cimport RequestHead
# (under another name: `KeptAlive` stays the module's global, which tests replace with a subclass)
from services.proxy.keepalive cimport KeptAlive as Cycle
from services.proxy.pipeline cimport Recorder, Txn


cpdef bint later(got) except -1
@cython.locals(gate=Gate)
cpdef prepare(ClientConn client, RequestHead head, container)
@cython.locals(t=Txn, flow=Flow, recorder=Recorder, chain=HookChain)
cpdef _admitted(ClientConn client, RequestHead head, container, Verdict verdict)
cpdef _hooked(ClientConn client, RequestHead head, Verdict verdict, Txn t, Flow flow, refusal)
@cython.locals(gate=Gate)
cpdef admit_connect(ClientConn client, RequestHead head, container)
@cython.locals(gate=Gate)
cpdef _connect_admitted(ClientConn client, Verdict verdict)
@cython.locals(cycle=Cycle)
cpdef begin_http(ClientConn client)
