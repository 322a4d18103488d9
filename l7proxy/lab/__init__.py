"""`l7proxy lab`: a local multi-node cluster on one machine, the way `kind` does it (docs/lab.md)."""
