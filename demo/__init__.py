"""The embedded default world: tokenizer and tiny models that need no model hub."""
