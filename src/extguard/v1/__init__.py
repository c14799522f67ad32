"""Generated gRPC code of extguard's own API (proto/extguard/v1); regenerate with scripts/gen-proto."""
