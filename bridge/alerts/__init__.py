"""The alert engine: rules over a tenant's points and gateway status, with persisted state."""
