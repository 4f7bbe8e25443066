"""Provisioning: tenants, their CAs, provisioning keys, device certificates and
the generated broker (Mosquitto) and proxy (HAProxy) configuration.

``pki`` holds the certificate work as pure functions over ``cryptography``
objects; ``render`` turns settings into Mosquitto, ACL and HAProxy text.
"""
