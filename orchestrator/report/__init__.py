"""What a results folder says: the tables (:mod:`.tables`), the claims tested against the paper
(:mod:`.claims`), the cost of a sweep before it runs (:mod:`.plan`), a saved run trained again
(:mod:`.reproduce`) and the report's MLflow run (:mod:`.mlflow_run`)."""
