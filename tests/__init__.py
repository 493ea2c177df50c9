"""The test suite (tests/README.md says what is where). A package, so that tests import their helpers as tests.helpers."""
