"""Generated modules of the magi-serve public gRPC API (see proto/magi/v1/*.proto)."""
