"""fedcore: federated learning over gRPC with mutual TLS, secure aggregation and DP."""

from fedcore.config import Experiment, load_experiment
from fedcore.engine import Coordinator, Site
from fedcore.errors import FedcoreError
from fedcore.simulation import run_simulation
from fedcore.tasks import Task, build_task, register_task

__version__ = "0.1.0"

__all__ = [
    "Coordinator",
    "Experiment",
    "FedcoreError",
    "Site",
    "Task",
    "build_task",
    "load_experiment",
    "register_task",
    "run_simulation",
]
