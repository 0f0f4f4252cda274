"""Local simulation: many virtual sites, the deployment's round code."""

from fedcore.simulation.inprocess import InProcessTransport
from fedcore.simulation.run import run_simulation
from fedcore.simulation.runners import site_name

__all__ = ["InProcessTransport", "run_simulation", "site_name"]
