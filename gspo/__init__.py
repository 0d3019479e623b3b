"""The ``gspo`` command line: one entry point for every service of the pipeline."""
