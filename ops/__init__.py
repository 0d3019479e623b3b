"""Running the pipeline: the local multi-process launcher (``gspo up``), reports, cluster recipes."""
