"""Developer tools: the `make run` launcher."""
