"""dmzbroker: a one-way, deny-by-default OT/IT boundary broker."""

__version__ = "0.1.0"
