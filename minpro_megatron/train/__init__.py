"""The RL program: the loop (trainer.py), where each step's batch comes from (batch_source.py), warm
start and evaluation, the run's checkpointed state and stop requests (stop.py)."""
