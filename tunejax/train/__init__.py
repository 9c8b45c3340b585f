"""Training: pure steps, the host loop and the task dispatch."""
from tunejax.train.tasks import run

__all__ = ["run"]
