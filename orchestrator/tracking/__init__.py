"""MLflow: :class:`.tracker.Tracker` (runs made or re-attached by tags), the outbox that defers a
call while the store is unavailable, and a trained model as an MLflow PyTorch model."""
