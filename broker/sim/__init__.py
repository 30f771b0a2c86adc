"""Plant simulators for the demo and the tests. Never imported by the broker halves."""
