"""Small, real-data example suites used by the demo, the quality benchmark and the tests."""
