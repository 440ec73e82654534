"""The HTTP service: `bentoml serve emserve.serving.service:EMServe` (docs/SERVICE.md)."""
