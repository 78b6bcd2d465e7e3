"""The HTTP surface: the FastAPI app, its middleware, dependencies and routes."""
