"""The wire contract: pydantic messages, the one ZeroMQ transport, the shared-memory frame ring."""
