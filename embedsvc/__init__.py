"""embedsvc: CLIP pooled-embedding retrieval service.

Layers import downward only: cli -> client | service -> store, encoder -> pooling, models.
"""

__version__ = "0.1.0"
