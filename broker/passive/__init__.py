"""Passive discovery: draft a policy's devices and signals from a packet capture of the
traffic a plant already has (docs/discovery.md). Reads a file; never sends a packet."""
