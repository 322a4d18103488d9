"""Sans-IO protocol parsers (HTTP/1, HTTP/2, gRPC framing, Kafka). Pure: no I/O, no project imports."""
