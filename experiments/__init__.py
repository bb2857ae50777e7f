"""Command-line entry points (absl flags over ml_collections configs)."""
