"""Upscaler fixtures: filled in with the upscaler service."""
