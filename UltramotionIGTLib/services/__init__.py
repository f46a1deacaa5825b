"""Services: the OpenIGTLink gateway (``ultramotion-igt serve``) and its built-in PLUS simulator.

- `protocol`: what the gateway sends back per frame (device names, metadata keys, the KPI record as
  JSON) and how a client decodes it. numpy only: the Slicer side imports it without torch or pyigtl.
- `igtl`: the OpenIGTLink transport: pyigtl's message codec on sockets the gateway owns (a
  resynchronising stream reader, a multi-client server whose sends never block the caller, a
  reconnecting client).
- `gateway`: `Gateway` (PLUS in, pipeline, label maps out) and the ``serve`` command.
- `plus_simulator`: `PlusSimulator`, a PLUS server that streams a recording (IMAGE + TRANSFORM).
- `recorder`: ``serve --record``: the outputs of ``run`` written as frames arrive.
"""
