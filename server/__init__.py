"""Training server: accepts examples over HTTP and trains vLLM's live weights in place.

settings.py (one source of settings) → engine/ (the training engine, wired in
engine/wiring.py) → api/ (routers and typed models) → app.py (the FastAPI app).
"""
