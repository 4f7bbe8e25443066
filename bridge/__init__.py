"""The cloud bridge: tenant brokers in, tenant storage and the alert engine out (``bridge run``)."""
