"""Registration pipelines: stages, methods, initializers and the high-level API."""
