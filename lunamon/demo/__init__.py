"""The demo: a luna-handlers-like service, generated traffic for it, and the run of both."""
