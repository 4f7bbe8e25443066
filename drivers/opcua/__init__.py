"""OPC UA driver (asyncua): ``driver`` (read, subscribe, write, reconnect), ``connection``
(one session, error conversion), ``monitor`` (subscribe mode), ``values`` (data values
as points) and ``security`` (application certificates)."""
