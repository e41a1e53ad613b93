"""The training engine: trainer, example log, coordination with vLLM, tokenization, losses,
checkpoint scheduling and the tensor-parallel ranks. It knows nothing of HTTP."""
