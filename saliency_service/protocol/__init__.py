"""The transports around one codec: gRPC, HTTP/JSON, KServe V1, TorchServe, and the web explorer."""
