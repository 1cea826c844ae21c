"""Evaluators: they see encoders (and data), never objectives. Installed as ``mmssl.eval``."""
