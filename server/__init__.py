"""Training server: accepts examples over HTTP and trains vLLM's live weights in place."""
