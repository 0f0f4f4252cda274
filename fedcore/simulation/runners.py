"""Where virtual sites train: worker threads or processes on this machine, or Ray tasks.

A virtual site exists only while it handles an instruction: the runner builds it from the
experiment and its index (its data is regenerated or re-sliced from the seed), runs the
instruction and forgets it. Memory therefore grows with the sites trained at once, not
with the federation's size. Each worker builds the task once.

Parallelism comes from workers, never from torch's intra-op threads: every worker (and the
coordinator's evaluation) runs torch with one thread. That uses the cores without
oversubscribing them, and it keeps results bit-identical for any number of workers, since
a multi-threaded reduction adds in a different order.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import json
import multiprocessing
import os
import signal
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import torch

from fedcore.aggregation import SiteStages
from fedcore.config import Backend, Experiment
from fedcore.engine import Instruction, Reply, Site
from fedcore.engine.site import SiteState
from fedcore.privacy.site_policy import SitePolicy, SitePrivacy
from fedcore.secagg.identity import LocalAuthority
from fedcore.simulation import shared_arrays
from fedcore.tasks import Task, default_partition, job_settings, task_for
from fedcore.tensors import Arrays

_TASKS: dict[tuple[str, str | None, str, str | None], tuple[Task, Arrays]] = {}


def site_name(k: int) -> str:
    """Virtual site k (1-based) holds part k of the data, like `--data builtin:k/N`."""
    return f"site-{k}"


def make_site(experiment: Experiment, k: int, device: str | None = None, *, live: bool = False) -> Site:
    """Virtual site k of the experiment, built from the seed (task cached per process).
    `live`: the site object serves many instructions, as a site agent's does (tests)."""
    # The job's task settings are part of the key: another file or schema is another task.
    job = json.dumps(job_settings(experiment), sort_keys=True)
    key = (experiment.task.name, experiment.task.model, job, device)
    if key not in _TASKS:
        task = task_for(experiment)
        if device is not None:
            task.device = torch.device(device)  # type: ignore[attr-defined]
        _TASKS[key] = (task, task.initial_parameters(0))
    task, template = _TASKS[key]
    n = experiment.simulation.sites
    data = task.site_data(
        f"builtin:{k}/{n}",
        partition=experiment.data.partition or default_partition(task),
        seed=experiment.seed,
        partitions=n,
    )
    # A virtual site keeps its ledger in memory (carried between rounds as its state) and
    # follows the experiment's secure_rng: the simulation is the researcher's own machine.
    privacy = SitePrivacy(SitePolicy(allow_insecure_rng=True))
    name = site_name(k)
    identity = LocalAuthority.shared(experiment.seed).identity(name)  # the deployed protocol, signatures too
    stages = SiteStages(name, privacy, remembers=live, identity=identity)
    return Site(name=name, task=task, data=data, template=template, stages=stages)


def handle(
    experiment: Experiment,
    k: int,
    instruction: Instruction,
    state: SiteState | None,
    device: str | None = None,
) -> tuple[Reply, SiteState | None]:
    """Run one instruction at virtual site k, given the state it kept from earlier rounds;
    return its reply and the state to keep. The site is gone afterwards."""
    site = make_site(experiment, k, device)
    site.import_state(state)  # also resets the task object, which all sites share
    reply = site.handle(instruction)
    return reply, site.export_state()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _start_worker() -> None:
    """A worker process: one torch thread, and freed memory kept for reuse. A round allocates
    and frees the same multi-megabyte buffers for every site; glibc would return them to the
    system and fault them back in each time: about 4,000 page faults per site and round at
    1M parameters in a secure round, a sixth of the workers' CPU time (20 x 1M, secagg_cost)."""
    set_threads(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    # Die with the coordinator: a simulation killed with SIGKILL leaves no workers behind
    # (they would hold its output pipes open and wait for work forever).
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the coordinator died before the line above
        os._exit(1)
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: big buffers come from the heap
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and the heap is not shrunk after each site


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_PR_SET_PDEATHSIG = 1  # Linux's prctl option


class SiteRunner(abc.ABC):
    """Runs virtual sites and keeps, explicitly and only for sites that have any, the state
    they must carry from round to round (`Task.site_state`)."""

    def __init__(self) -> None:
        self.states: dict[int, SiteState] = {}

    def state_to_json(self) -> dict[str, Any]:
        """The sites' states between rounds (saved with the run's checkpoint)."""
        return {str(k): state.to_json() for k, state in sorted(self.states.items())}

    def load_state_json(self, data: dict[str, Any]) -> None:
        self.states = {int(k): SiteState.from_json(v) for k, v in data.items()}

    async def run(self, k: int, instruction: Instruction) -> Reply:
        """Site k's reply to `instruction`."""
        reply, state = await self._run(k, instruction, self.states.get(k))
        if state is None:
            self.states.pop(k, None)
        else:
            self.states[k] = state
        return reply

    @abc.abstractmethod
    async def _run(
        self, k: int, instruction: Instruction, state: SiteState | None
    ) -> tuple[Reply, SiteState | None]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class LocalRunner(SiteRunner):
    """One worker: a thread of this process. More: worker processes, forked where the system
    can (they start at once and share the parent's loaded modules copy-on-write, like torch's
    DataLoader workers; a simulation holds no gRPC channel and torch runs one thread, which is
    what makes forking safe here), spawned elsewhere.

    Worker processes get sites in batches: the requests made in one turn of the event loop
    (a stage's instructions to all its sites) are cut into `BATCHES_PER_WORKER` batches per
    worker, one task each. A task's fixed cost (futures, pipes, wake-ups, pickling the
    experiment) is then paid per batch, not per site: with 100 sites it was most of the
    coordinator's time. Large arrays cross through shared memory (`shared_arrays`). A
    batch's replies arrive together: at a round deadline, a site whose batch had not
    finished counts as late even if its own work was done (a batch is at most a quarter of
    a worker's share of the stage)."""

    BATCHES_PER_WORKER = 4

    def __init__(self, experiment: Experiment, *, workers: int, device: str | None = None) -> None:
        super().__init__()
        self.experiment = experiment
        self.device = device
        self.workers = workers
        self._executor: Executor
        if workers == 1:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="site")
        else:
            self._executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(
                    "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                ),
                initializer=_start_worker,
            )
        self._shared = shared_arrays.Publisher()
        self._pending: list[tuple[int, Instruction, SiteState | None, asyncio.Future[Any]]] = []
        self._batches: set[asyncio.Future[None]] = set()  # batches in flight (held: not collected)

    async def _run(
        self, k: int, instruction: Instruction, state: SiteState | None
    ) -> tuple[Reply, SiteState | None]:
        loop = asyncio.get_running_loop()
        if self.workers == 1:
            return await loop.run_in_executor(
                self._executor, handle, self.experiment, k, instruction, state, self.device
            )
        if not self._pending:
            loop.call_soon(self._dispatch)
        future: asyncio.Future[tuple[Reply, SiteState | None]] = loop.create_future()
        self._pending.append((k, instruction, state, future))
        return await future

    def _dispatch(self) -> None:
        pending, self._pending = self._pending, []
        # Sizes differ by one at most, larger batches first: the workers end a stage together.
        size, larger = divmod(len(pending), min(len(pending), self.BATCHES_PER_WORKER * self.workers))
        start = 0
        while start < len(pending):
            end = start + size + (larger > 0)
            larger -= 1
            task = asyncio.ensure_future(self._run_batch(pending[start:end]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            start = end

    async def _run_batch(
        self, batch: list[tuple[int, Instruction, SiteState | None, asyncio.Future[Any]]]
    ) -> None:
        used: list[int] = []
        try:
            payload = self._shared.dumps(
                [(self.experiment, k, i, s, self.device) for k, i, s, _ in batch], used
            )
            data = await asyncio.get_running_loop().run_in_executor(
                self._executor, _handle_batch, payload, self._shared.owner
            )
            outcomes = shared_arrays.loads(data)
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as err:  # unpicklable, or the pool broke: every site of the batch fails
            outcomes = [(False, err)] * len(batch)
        finally:
            self._shared.release(used)
        for (*_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():  # a site the coordinator stopped waiting for
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._shared.close()


def _handle_batch(payload: bytes, owner: str) -> bytes:
    """`handle` for each site of a batch, in a worker process: (True, result) or (False,
    the exception) per site, pickled by shared_arrays."""
    outcomes: list[tuple[bool, object]] = []
    for args in shared_arrays.loads(payload):
        try:
            outcomes.append((True, handle(*args)))
        except Exception as err:
            outcomes.append((False, err))
    return shared_arrays.dumps(outcomes, shared_arrays.reply_export(owner))


class RayRunner(SiteRunner):
    """Each site's work is a Ray task (one CPU each) on a local Ray instance or a cluster."""

    def __init__(self, experiment: Experiment, *, workers: int | None, address: str | None) -> None:
        super().__init__()
        try:
            import ray
        except ImportError:
            from fedcore.errors import ConfigError

            raise ConfigError("backend 'ray' needs Ray: pip install 'fedcore[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            # Offline and CPU-only by default: no usage reports, no rewriting of CUDA_VISIBLE_DEVICES.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            options: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False}
            if address is None:
                options["num_cpus"] = workers or cores()
            ray.init(**options)
        self._experiment = ray.put(experiment)
        self._remote = ray.remote(num_cpus=1)(_ray_handle)

    async def _run(
        self, k: int, instruction: Instruction, state: SiteState | None
    ) -> tuple[Reply, SiteState | None]:
        result: tuple[Reply, SiteState | None] = await self._remote.remote(
            self._experiment, k, instruction, state
        )
        return result

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def _ray_handle(
    experiment: Experiment, k: int, instruction: Instruction, state: SiteState | None
) -> tuple[Reply, SiteState | None]:
    if torch.get_num_threads() != 1:  # a Ray task holds one CPU
        set_threads(1)
    return handle(experiment, k, instruction, state)


def make_runner(experiment: Experiment, device: str | None = None) -> SiteRunner:
    sim = experiment.simulation
    if sim.backend is Backend.RAY:
        return RayRunner(experiment, workers=sim.workers, address=sim.ray_address)
    return LocalRunner(experiment, workers=sim.workers or cores(), device=device)
