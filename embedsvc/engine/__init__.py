"""The application core: request and result types, model runtimes with their batchers, the embedding
pipeline and the collection operations over a store (`engine.Engine`), configured by `config.EngineConfig`.

The service's transports (gRPC, HTTP) and the bulk jobs sit on it; it imports no transport. Nothing is
imported here, so `embedsvc.engine.config` loads without torch.
"""
