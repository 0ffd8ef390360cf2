"""magi.v1 API: generate.proto and its generated modules (scripts/gen_proto.py)."""
