"""Test-only infrastructure: real services started on loopback by test fixtures."""
