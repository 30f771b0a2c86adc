"""The enterprise half (IT side): reads the spool, serves consumers over mutual TLS.

It has no code path, credential or route toward the plant, and never imports the plant half.
"""
