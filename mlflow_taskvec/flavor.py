"""Where models saved by mlflow-taskvec 0.1 find their pyfunc loader.

Their MLmodel files name ``loader_module: mlflow_taskvec.flavor``; the flavor itself
lives in ``mlflow_taskvec.mlflow.flavor`` (new models name that module).
"""

from mlflow_taskvec.mlflow.flavor import _load_pyfunc  # noqa: F401
