"""Geometric attention: sequence mechanisms whose tokens carry poses or positions on a manifold."""
