"""Stand-ins for tests and benchmarks: never shipped in a service image, refused by the services unless
PIA_ALLOW_TEST_PIPELINES=1 (tests/conftest.py and benchmarks set it)."""
