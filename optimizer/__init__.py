"""Memory-frugal optimizers for training the weights vLLM serves."""

from optimizer.apollo import Apollo, ApolloMini

__all__ = ["Apollo", "ApolloMini"]
