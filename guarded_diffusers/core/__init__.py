"""The pipeline-agnostic guard: stages, checks, locate, casting, state, report, plans, plugins."""
