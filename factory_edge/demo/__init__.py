"""``./scripts/demo``: the whole story on one machine, on loopback.

Simulated machines, two tenants each with its own Mosquitto behind one
SNI-routing HAProxy, the provisioning API over HTTPS, a gateway provisioned
with ``agent provision`` and a key, the agent polling and publishing, and
the bridge storing into the tenant's SQLite and alerting when the CNC
overheats. ``python -m factory_edge.demo --help`` lists the options.
"""
