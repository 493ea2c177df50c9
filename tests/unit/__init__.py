"""Unit tests, one file per pipeline module: tests/unit/test_<module>.py."""
