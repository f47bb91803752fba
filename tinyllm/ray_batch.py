"""`tinyllm batch --ray [ADDRESS]`: the batch job of batch.py spread over a Ray cluster.

What runs where:
- the driver (this process) does everything batch.py does on one machine: reads and
  validates the input (bad lines become error lines here), checks --resume's fingerprints,
  holds the output's lock and is its only writer (batch.OutputFile: one fsync'd line per
  result), draws the progress bar and prints the summary. It is batch.run_batch with another
  `start`: only where the engine lives changes.
- replicas: Ray actors, one `LLM` each (built once, `Replica.__init__`), one per GPU by
  default (or one per node without GPUs, with that node's cores). The driver sends each
  replica chunks of parsed requests (`--max-batch` of them, two chunks at a time, so the
  engine's continuous batching always has the next requests waiting while a chunk's last one
  finishes; the two calls run in two threads of the actor, sharing one engine as engine.py
  allows). A replica tokenizes, generates, and returns the chunk's result records.

Exactly once: a result line is written by the driver, and only for a line still in flight
(`RayJob.inflight`); a chunk's results come back whole with its call, so a replica that dies
mid-chunk (os._exit, SIGKILL, a lost node) returns none of them: the call fails with a
RayActorError, the chunk's lines go back to the front of the queue for whichever replica is
free next, and Ray restarts the dead actor (max_restarts) which rejoins once its model is
loaded again. Nothing is retried by Ray behind the driver's back (max_task_retries=0), so no
result can arrive twice. A line in flight during MAX_ATTEMPTS crashes gets an error line
("replica_crashed") rather than killing replica after replica. A killed driver loses only the
lines in flight (its replicas die with it, being owned by it); --resume then works as locally.

Why actors and not Ray Data: validation, duplicate ids and --resume are sequential over the
input and belong to the driver anyway (batch.BatchJob.items); with actors the driver knows
exactly which lines each call carries, which is what exactly-once needs, and nothing is
materialized in the object store. Ray Data's map_batches with an actor pool would re-read the
JSONL itself (losing bad-line handling), retry blocks on its own terms and add its streaming
executor's start-up on every run (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .batch import (
    BatchJob,
    Item,
    LineError,
    engine_request,
    error_record,
    result_record,
    run_batch,
    run_identity,
    served_name,
)
from .errors import TinyLLMError

CALLS_PER_REPLICA = 2  # chunks in flight per replica (actor threads): one runs, one waits
MAX_ATTEMPTS = 3  # crashes a line may be in flight for before it gets an error line
READY_POLL_S = 0.5  # how long the driver waits for a result before checking Ctrl-C again

# A planted fault for tests (the driver passes it to every replica): {"exit_after": k,
# "once": path} -> the first replica to finish k requests calls os._exit(1) (once per job: it
# creates `once`); {"pid_dir": path} -> each replica process writes its pid there at start.
TEST_FAULT: dict | None = None


def add_ray_args(p: argparse.ArgumentParser):
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (pip install 'tinyllm[ray]'): ADDRESS of its head, or auto for "
        "the one `ray start` runs here; without ADDRESS a local cluster is started for the job "
        "(default: off, one process)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: engine replicas, each an LLM with its own KV cache (default: one per "
        "GPU in the cluster, else one per node using its cores)",
    )


def run_ray_batch(a) -> int:
    """`tinyllm batch --ray`: batch.run_batch with the engine on Ray replicas."""
    if a.replicas is not None and a.replicas < 1:
        raise TinyLLMError(f"--replicas must be at least 1 (got {a.replicas})")
    return run_batch(a, start=lambda args, quiet: start_replicas(args, quiet, TEST_FAULT))


def batch(
    input,
    output,
    model=None,
    *,
    address: str | None = None,
    replicas: int | None = None,
    resume: bool = False,
    progress: bool = False,
    **options,
) -> int:
    """The Python entry point: `tinyllm batch -i input -o output --ray [address]`. `options`
    are the other flags by their Python names (max_batch=16, temperature=0, max_tokens=64,
    ...). Uses the Ray connection of this process when there is one (ray.init() called
    before), else connects to `address` ("auto": a running cluster) or starts a local
    cluster. Returns the command's exit code; fatal problems raise TinyLLMError."""
    from .cli import build_parser

    a = build_parser().parse_args(["batch", "-i", str(input), "-o", str(output)])
    a.ray, a.model, a.replicas, a.resume = address or "", model, replicas, resume
    a.no_progress = not progress
    for k, v in options.items():
        if not hasattr(a, k) or k in ("func", "command"):
            raise TypeError(f"batch() got an unexpected option {k!r}")
        setattr(a, k, v)
    return run_ray_batch(a)


# ---- the replicas ------------------------------------------------------------------------


class Replica:
    """One engine on one GPU (or a node's cores), as a Ray actor. Errors loading the model
    are kept for ready() rather than raised, so that the driver reports them in one line."""

    def __init__(self, args, cores: int | None = None, fault: dict | None = None):
        from .options import load_llm, sampling_from_args
        from .threads import default_threads

        self.fault, self.finished = fault or {}, 0
        self.lock = threading.Lock()
        if self.fault.get("pid_dir"):
            Path(self.fault["pid_dir"], str(os.getpid())).touch()
        self.error, self.llm = None, None
        if cores and args.threads is None:  # BLAS threads: the cores Ray gave this replica,
            args.threads = min(cores, default_threads())  # less those busy (threads.py: spin)
        try:
            self.llm = load_llm(args, max_batch=args.max_batch, quiet=True)
            self.defaults = sampling_from_args(args)
            self.identity = run_identity(args, self.llm.model_dir)
            self.model_name = served_name(args, self.llm)
        except (TinyLLMError, OSError, ValueError) as e:
            self.error = str(e)

    def ready(self) -> dict:
        import ray

        info = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
        if self.error is not None:
            return {**info, "error": self.error}
        return {**info, "identity": self.identity, "backend": self.llm.backend.name}

    def generate(self, items: list[Item]) -> list[tuple[int, dict]]:
        """(input line, result record without fingerprint) of every item, in finishing order.
        Two calls may run at once (two actor threads): their engine.run() generators share
        the engine's steps (engine.py), so the batch stays full across chunk boundaries."""
        out, reqs = [], []
        for k, item in enumerate(items):
            try:
                reqs.append(engine_request(self.llm, item, self.defaults, k))
            except LineError as e:
                out.append((item.lineno, error_record(item.custom_id, item.lineno, e)))
        for ev in self.llm.engine.run(reqs):
            if ev.kind in ("finish", "error"):
                item = items[ev.index]
                out.append((item.lineno, result_record(item, ev, self.model_name)))
                self._finished_one()
        return out

    def _finished_one(self):
        with self.lock:
            self.finished += 1
            k, once = self.fault.get("exit_after"), self.fault.get("once")
            if k is not None and self.finished >= k and once:
                try:
                    os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:  # another replica (or this one before a restart) did
                    return
                os._exit(1)


@dataclass
class Slot:
    """The driver's view of one replica."""

    actor: object
    name: str
    calls: int = 0  # generate() calls in flight
    state: str = "alive"  # alive | restarting (Ray is restarting it) | dead
    deaths: int = 0
    ready_ref: object = None
    last_error: str = ""


@dataclass
class Pool:
    slots: list[Slot]
    chunk: int  # requests per generate() call: --max-batch
    pids: list[int] = field(default_factory=list)  # of every replica process started

    def free(self):
        return [s for s in self.slots if s.state == "alive" and s.calls < CALLS_PER_REPLICA]


def _ray():
    try:
        import ray
    except ImportError:
        raise TinyLLMError(
            "--ray needs Ray, which is not installed: pip install 'tinyllm[ray]'"
        ) from None
    return ray


def connect(ray, address: str, quiet: bool) -> bool:
    """Connect to (or start) the cluster; True when this call did, so the job disconnects."""
    if ray.is_initialized():  # the Python entry point, inside a Ray program
        return False
    kw = dict(logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    probe(address)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a running cluster (auto)" if address == "auto" else address
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyLLMError(
            f"cannot connect to Ray at {where}: {first}; start one with `ray start --head`, "
            f"or pass --ray without an address to start a local cluster for the job"
        ) from None
    return True


def probe(address: str):
    """Refuse at once an address whose head does not answer (ray.init retries for minutes)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # nothing to probe: Ray finds (or fails to find) the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise TinyLLMError(
            f"cannot reach the Ray head at {address}: {e.strerror or e}; check the address "
            f"(`ray status` on the head prints it), or pass --ray without an address to start "
            f"a local cluster for the job"
        ) from None


def plan_replicas(ray, wanted: int | None) -> tuple[int, dict]:
    """(replicas, Ray resources of each): one per GPU, else per node with its cores."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        n = wanted or gpus
        if n > gpus:
            raise TinyLLMError(
                f"--replicas {n}: the cluster has {gpus} GPU(s), one replica per GPU; "
                f"lower --replicas"
            )
        return n, {"num_gpus": 1, "num_cpus": 1}
    cpus = [int(nd["Resources"].get("CPU", 0)) for nd in nodes if nd["Resources"].get("CPU", 0)]
    if not cpus:
        raise TinyLLMError("the Ray cluster has no CPUs or GPUs to run replicas on")
    n = wanted or len(cpus)
    if n > sum(cpus):
        raise TinyLLMError(
            f"--replicas {n}: the cluster has {sum(cpus)} CPU(s) and no GPU; lower --replicas"
        )
    per_node = -(-n // len(cpus))  # replicas on the busiest node
    return n, {"num_cpus": max(1, min(cpus) // per_node)}


def start_replicas(a, quiet: bool, fault: dict | None = None):
    """batch.run_batch's `start`: connect, start the replicas, wait for their models; returns
    (job factory, cleanup). Any failure here happens before the output file is opened."""
    from .hub import resolve

    ray = _ray()
    started = connect(ray, a.ray, quiet)
    actors = []

    def stop():
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        if started:
            ray.shutdown()

    try:
        n, res = plan_replicas(ray, a.replicas)
        args = argparse.Namespace(**{k: v for k, v in vars(a).items() if k != "func"})
        cores = None if "num_gpus" in res else res["num_cpus"]
        remote = ray.remote(Replica).options(
            max_restarts=MAX_ATTEMPTS, max_task_retries=0, max_concurrency=CALLS_PER_REPLICA, **res
        )
        actors += [remote.remote(args, cores, fault) for _ in range(n)]
        try:
            infos = ray.get([r.ready.remote() for r in actors])
        except (*_died(ray), ray.exceptions.RayTaskError) as e:  # died while loading
            raise TinyLLMError(f"a replica could not start: {_last_line(e)}") from None
        want = run_identity(a, resolve(a.model).path)
        for i, info in enumerate(infos):
            if "error" in info:
                raise TinyLLMError(f"replica {i} could not load the model: {info['error']}")
            if info["identity"] != want:
                raise TinyLLMError(
                    f"replica {i} (node {info['node'][:8]}) resolved "
                    f"{a.model or 'the default model'} to other files than this machine; "
                    f"give every node the same model path"
                )
        if not quiet:
            n_nodes = len({info["node"] for info in infos})
            print(
                f"ray: {n} replica(s) on {n_nodes} node(s), {infos[0]['backend']} backend, "
                f"{res} each",
                file=sys.stderr,
            )
    except BaseException:
        stop()
        raise
    pool = Pool([Slot(actor, f"replica {i}") for i, actor in enumerate(actors)], a.max_batch)
    pool.pids = [info["pid"] for info in infos]
    return (lambda *job_args: RayJob(pool, *job_args)), stop


# ---- the driver's loop ---------------------------------------------------------------------


class RayJob(BatchJob):
    """BatchJob with the engine on replicas: items() and write() from batch.py; chunks of
    --max-batch items go out, result records come back and are written once each."""

    def __init__(self, pool: Pool, defaults, in_path, out, done, tally, run):
        super().__init__(None, defaults, in_path, out, done, tally, run)
        self.pool = pool
        self.inflight: dict[int, Item] = {}  # input line -> item sent and not yet written
        self.attempts: dict[int, int] = {}  # input line -> crashes it was in flight for

    def run(self, total: int, progress: bool = True):
        from tqdm.auto import tqdm

        ray = _ray()
        t0 = time.perf_counter()
        retry: deque[Item] = deque()
        items = self.items()
        calls: dict = {}  # ObjectRef of a generate() call -> (slot, its items)
        with tqdm(
            total=total,
            unit="req",
            desc="batch (ray)",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        ) as self.bar:
            while True:
                for slot in self.pool.free():
                    chunk = self._take(retry, items)
                    if not chunk:
                        break
                    calls[slot.actor.generate.remote(chunk)] = (slot, chunk)
                    slot.calls += 1
                restarting = {s.ready_ref: s for s in self.pool.slots if s.state == "restarting"}
                if not calls:  # nothing running: done, or every replica is down
                    if not self._more(items, retry):
                        break
                    if not restarting:
                        raise self._all_dead()
                waiting = list(calls) + list(restarting)
                ready, _ = ray.wait(waiting, num_returns=1, timeout=READY_POLL_S)
                for ref in ready:
                    if ref in restarting:
                        self._rejoin(ray, restarting[ref], ref)
                        continue
                    slot, chunk = calls.pop(ref)
                    slot.calls -= 1
                    try:
                        results = ray.get(ref)
                    except _died(ray) as e:  # the replica's process (or node) died
                        self._crashed(ray, slot, chunk, retry, e)
                        continue
                    except ray.exceptions.RayTaskError as e:  # a bug in a replica: stop
                        raise TinyLLMError(
                            f"{slot.name} failed: {_last_line(e)}; the results written are kept: "
                            f"rerun with --resume"
                        ) from None
                    for lineno, rec in results:
                        if self.inflight.pop(lineno, None) is not None:  # written once, ever
                            self.write(lineno, rec, t0)
        self.tally.seconds = max(time.perf_counter() - t0, 1e-9)

    def _more(self, items, retry) -> bool:
        """Whether work remains (pulls one item back into `retry` to find out)."""
        if retry:
            return True
        nxt = next(items, None)
        if nxt is None:
            return False
        retry.append(nxt)
        return True

    def _take(self, retry: deque, items) -> list[Item]:
        """The next chunk: crashed replicas' lines first, then new input lines."""
        size = self.pool.chunk
        chunk = [retry.popleft() for _ in range(min(size, len(retry)))]
        while len(chunk) < size:
            item = next(items, None)
            if item is None:
                break
            chunk.append(item)
        for item in chunk:
            self.inflight[item.lineno] = item
        return chunk

    def _crashed(self, ray, slot: Slot, chunk: list[Item], retry: deque, e):
        """A replica died with `chunk` in flight: its lines go back to the queue (or get an
        error line after MAX_ATTEMPTS crashes); Ray restarts the actor, which rejoins when
        ready() answers."""
        slot.last_error = _last_line(e)
        back = []
        for item in chunk:
            if self.inflight.pop(item.lineno, None) is None:
                continue
            self.attempts[item.lineno] = self.attempts.get(item.lineno, 0) + 1
            if self.attempts[item.lineno] >= MAX_ATTEMPTS:
                self.fail(
                    item.custom_id,
                    item.lineno,
                    LineError(
                        "replica_crashed",
                        f"the replica running this request died {MAX_ATTEMPTS} times "
                        f"({slot.last_error})",
                    ),
                )
            else:
                back.append(item)
        retry.extendleft(reversed(back))  # (front of the queue, in input order)
        if slot.state == "alive":
            slot.deaths += 1
            slot.state = "restarting"
            slot.ready_ref = slot.actor.ready.remote()
            if not self.bar.disable:
                self.bar.write(f"ray: {slot.name} died ({slot.last_error}); restarting it")

    def _rejoin(self, ray, slot: Slot, ref):
        try:
            info = ray.get(ref)
        except _unavailable(ray):  # still restarting: ask again, shortly
            time.sleep(READY_POLL_S / 5)
            slot.ready_ref = slot.actor.ready.remote()
            return
        except ray.exceptions.RayActorError as e:  # out of restarts
            slot.state, slot.last_error = "dead", _last_line(e)
            return
        if "error" in info:
            slot.state, slot.last_error = "dead", info["error"]
            return
        slot.state = "alive"
        self.pool.pids.append(info["pid"])

    def _all_dead(self) -> TinyLLMError:
        why = "; ".join(f"{s.name}: {s.last_error}" for s in self.pool.slots)
        return TinyLLMError(
            f"every replica died and Ray could not restart them ({why}); the results written "
            f"are kept: rerun with --resume"
        )


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def _died(ray) -> tuple:
    """The errors of a call whose replica process died: the actor's own (killed, crashed,
    restarting), its worker's or node's, or Ray's memory monitor killing it."""
    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _unavailable(ray):
    """Ray's "temporarily unavailable" actor error (Ray >= 2.30), or nothing to catch."""
    return getattr(ray.exceptions, "ActorUnavailableError", ())
