"""Guarded pipeline classes and what they add to diffusers' pipelines."""
