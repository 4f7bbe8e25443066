"""Sparkplug B 3.0: the payload codec and the topic namespace, shared by the agent (edge node) and the bridge
(host application)."""
