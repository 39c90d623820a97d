"""Clients of the two services: a thin stub wrapper (api), the CLI and the Gradio page."""
