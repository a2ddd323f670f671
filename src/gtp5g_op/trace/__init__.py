"""The trace pipeline: tracefs reading, the trace_pipe parser, process validation, the pipeline, watch runs."""
