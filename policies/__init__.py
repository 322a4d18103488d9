"""Policy engine: YAML -> model -> identities -> compiled MapState + L7 rule sets. Pure: no I/O
except loading files at the edge."""
