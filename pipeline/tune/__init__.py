"""Stage 3: hyperparameter search with Ray Tune over distributed training trials."""
