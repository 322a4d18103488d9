"""Test protos; *_pb2*.py are generated at test time (git-ignored)."""
