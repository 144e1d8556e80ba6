"""The demo: a luna-handlers-like service, traffic for it, and its report."""
