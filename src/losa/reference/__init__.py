"""Offline reference data and model: the real-text corpus (``corpus``) and the small reference LM (``train``)."""
