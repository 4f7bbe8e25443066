"""The on-site agent: polls machines, buffers every reading, publishes over MQTT."""
