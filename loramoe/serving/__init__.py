"""Serving: an MLflow pyfunc model (base + adapter) that answers prompts."""
