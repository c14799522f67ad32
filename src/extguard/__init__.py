"""extguard: a guard for LLM traffic behind Envoy (ext_proc and ext_authz servers)."""

__version__ = "0.1.0"
