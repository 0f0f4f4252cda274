"""The coordinator's server: gRPC transport and the `fedcore server` process."""
