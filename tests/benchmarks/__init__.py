"""The benchmark scripts of benchmarks/, run tiny on CPU so that they cannot rot."""
