"""The experiment: a spec file and preset resolved (:mod:`.experiment`), its stages, the search
space (:mod:`.space`), early stopping's settings (:mod:`.early_stopping`) and the paper's own numbers
(:mod:`.paper`). Nothing here imports Ray, Optuna or MLflow."""
