"""Distributed training: ``train_loop_per_worker`` (loop.py) run by ``run_training`` (run.py)."""
