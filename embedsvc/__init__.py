"""embedsvc: CLIP pooled-embedding retrieval service.

Layers import downward only: cli -> service (gRPC, HTTP) | jobs | training -> engine -> store, encoder ->
pooling, models; the client imports only its generated API code (tests/test_layering.py).
"""

__version__ = "0.1.0"
