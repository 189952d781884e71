"""Float16-safe weights: exact power-of-two rescales of scale-invariant cuts, baked in (docs/bake.md)."""
