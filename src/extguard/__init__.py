"""extguard: a guard for LLM traffic behind Envoy, served as a gRPC ext_proc server."""

__version__ = "0.1.0"
