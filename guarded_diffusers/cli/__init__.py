"""The fluxguard command."""
