"""Converters from other frameworks' checkpoints to mmssl encoder exports."""
