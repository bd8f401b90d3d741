"""The server: gRPC and HTTP transports over one engine (embedsvc.engine), with its config, auth, admission
control and metrics. Only the CLI's `serve` imports it."""
