"""Sinks: where finished points go. One module per sink; all are exported by ``lunamon``."""
