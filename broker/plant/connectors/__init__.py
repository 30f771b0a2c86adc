"""The plant's connectors, one module per protocol, and their registry (registry.py).

Empty on purpose: importing a pure parser of this package (dnp3_frames, bacnet_frames,
modbus_plan, ...) must not load every connector's I/O and its libraries, as the passive
discovery command (broker.passive) and the CLI's other readers of these parsers rely on.
"""
