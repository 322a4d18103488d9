"""Kafka protocol session for the proxy (layer.py: logic, session.py: asyncio glue)."""
