"""The one-way channel between the plant half and the enterprise half.

Two types, never one object with both ends: the plant half holds a sender, the enterprise
half a receiver.
"""
