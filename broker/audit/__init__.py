"""The tamper-evident audit log: what happened at the boundary, provably in order."""
