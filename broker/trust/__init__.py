"""Certificates, keys and TLS contexts. TLS is mandatory: there is no skip-verify anywhere."""
