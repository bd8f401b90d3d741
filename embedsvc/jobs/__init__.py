"""Bulk jobs on top of the engine (never a server's transport): `embedsvc index`, `embedsvc compare`."""
