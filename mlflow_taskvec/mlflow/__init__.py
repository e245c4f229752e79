"""The MLflow layer: the ``taskvec`` flavor, MLflow references and downloads, registration
with lineage, governance (approval, lineage, verification), search, evaluation and reports.

Everything MLflow-specific lives here; the engine, the recipe and the compose step below
it never import MLflow.
"""
