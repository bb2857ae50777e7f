"""Experiment configs: each module's docstring is the command that runs it."""
