"""The HTTP layer: routers, typed request/response models and their dependencies."""
