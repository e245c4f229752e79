"""The MLflow layer: references to registry models and runs, registration with lineage."""
