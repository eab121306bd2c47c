"""Everything that trains and measures one model: datasets, models, methods, losses, post-hoc LA, metrics."""
