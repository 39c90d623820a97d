"""gRPC services of Product in Action."""
