"""Memory-frugal optimizers for training the weights vLLM serves (the step's functions:
optimizer.functional)."""

from optimizer.apollo import Apollo, ApolloMini
from optimizer.kernels import DEFAULT_TILES, ProjectionTiles, Tiles

__all__ = ["DEFAULT_TILES", "Apollo", "ApolloMini", "ProjectionTiles", "Tiles"]
