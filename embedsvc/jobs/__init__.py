"""Bulk jobs on top of the service layer: `embedsvc index`."""
