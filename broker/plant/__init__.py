"""The plant half (OT side): reads devices, applies the policy, writes the spool.

It opens no listening socket and never imports the enterprise half.
"""
