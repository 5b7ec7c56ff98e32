"""Runnable examples of amct_core (``python -m examples.digits``)."""
