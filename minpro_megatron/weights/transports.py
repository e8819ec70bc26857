"""Ways to move HF-named weight buckets into SGLang servers.

* DistributedTransport: ``/init_weights_update_group`` + ``/update_weights_from_distributed``. The trainer
  is rank 0 of one group joined by every server TP rank (server k's ranks start at 1 + sum of earlier TP
  sizes); each bucket is broadcast once to all servers. gloo on CPU, nccl when the tensors are on CUDA.
  ``flattened=True`` sends one uint8 buffer per bucket (load_format "flattened_bucket"), else one
  broadcast per tensor. ``overlap=True`` (default) stages bucket i+1 (pulling it from the exporter, which
  gathers it from the learner ranks, and flattening it) in one background thread while bucket i is
  broadcast; at most three staged buckets are alive at once, and the bytes sent are the same as staging
  them in turn (tests/rollout/test_transport_overlap.py). On CPU the flat buckets are staged into
  buffers kept across buckets and syncs (StagingPool, ``reuse_staging=True``): one copy per tensor into
  already-touched memory instead of page-faulting a fresh buffer per bucket. A server that dies mid-broadcast makes the trainer's broadcast fail or wait for
  the group timeout (``timeout_s``); WeightSync then drops the group and rebuilds it on the next sync.
* DiskTransport: safetensors shards + config/tokenizer files in a directory, then
  ``/update_weights_from_disk`` on each server (servers must see the directory: same host or shared FS).
* TensorTransport: ``/update_weights_from_tensor`` with SGLang's FlattenedTensorBucket payload, for
  COLOCATED GPU runs (learner and server on the same node). The payload is a ForkingPickler pickle of
  the tensors: CUDA tensors travel as CUDA IPC handles (no copy). It cannot run on CPU: CPU tensors are
  pickled as shared-memory file descriptors fetched through multiprocessing's resource_sharer, whose
  authentication fails for an unrelated process and kills the server. On CPU use
  the distributed or disk transport; the tests check this payload's construction only.

Every transport returns TransportStats (bytes, buckets, tensors, seconds).

Length: three transports behind one ``Transport`` interface plus the shared bucket staging/prefetch they all use.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from minpro_megatron.serving.control import ServerControl, ServerControlError
from minpro_megatron.convert.buckets import Bucket, FlatBucket, bucket_nbytes, dtype_name, validate_bucket
from minpro_megatron.weights.update_group import destroy_update_group, host_update_store, init_update_group

__all__ = [
    "TransportStats", "Transport", "DistributedTransport", "DiskTransport", "TensorTransport", "Staged", "StagingPool",
    "stage_buckets", "with_last",
]


@dataclass
class TransportStats:
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0
    seconds: float = 0.0
    # where the distributed transport's time went (sums over buckets): waiting for a staged bucket, the
    # broadcast itself, and waiting after it for the servers' POSTs to return (their load into the model)
    parts: dict[str, float] = field(default_factory=dict)


def with_last(buckets: Iterable[Bucket]) -> Iterator[tuple[Bucket, bool]]:
    """(bucket, is_last) pairs, so the weight_version label is set only once the last bucket is in."""
    it = iter(buckets)
    try:
        cur = next(it)
    except StopIteration:
        return
    for nxt in it:
        yield cur, False
        cur = nxt
    yield cur, True


@dataclass
class Staged:
    """One bucket ready for the wire: what the servers' POST names and the tensors to broadcast, in order."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    payload: list[torch.Tensor]
    release: Callable[[], None] | None = None  # once the payload is on the wire: its buffer may be reused

    def done(self) -> None:
        if self.release is not None:
            self.release, release = None, self.release
            release()


class StagingPool:
    """Flat CPU staging buffers kept across buckets and syncs. A fresh buffer above glibc's 32 MiB mmap
    threshold is mapped anew on every allocation and page-faulted while it is filled (measured here: a fresh
    600 MiB buffer filled at 0.3-1 GiB/s, a touched one at ~4 GiB/s, tools/bench_weight_sync.py). Every
    buffer has the size of the largest bucket seen, so any bucket fits any buffer; at most ``keep`` are
    held between syncs (the prefetch keeps three buckets alive: rank 0 holds 3 x the bucket size)."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._size = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if nbytes > self._size:  # a bigger bucket: the smaller buffers can never serve it again
                self._size, self._free = nbytes, []
            if self._free:
                return self._free.pop()
            size = self._size
        return torch.empty(size, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if buf.numel() == self._size and len(self._free) < self.keep:
                self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free, self._size = [], 0


def _stage(bucket: Bucket, index: int, flattened: bool, device: torch.device, pool: StagingPool | None = None) -> Staged:
    validate_bucket(bucket, f"bucket {index}")
    if flattened and pool is not None and device.type == "cpu":
        # CPU only: a CUDA buffer is cached by torch's allocator already, and reusing one while an async
        # NCCL send may still read it would need stream sync this path does not do
        buf = pool.take(bucket_nbytes(bucket))
        flat = FlatBucket.from_bucket(bucket, out=buf)
        return Staged(flat.names, flat.dtypes, flat.shapes, [flat.flat], release=lambda: pool.give(buf))
    if flattened:
        flat = FlatBucket.from_bucket(bucket, device=device)
        return Staged(flat.names, flat.dtypes, flat.shapes, [flat.flat])
    return Staged(
        [n for n, _ in bucket],
        [dtype_name(t.dtype) for _, t in bucket],
        [list(t.shape) for _, t in bucket],
        [t.detach().to(device).contiguous() for _, t in bucket],
    )


_END = object()


class _Prefetch:
    """Stage buckets in one background thread, at most ``depth`` staged buckets alive (the consumer calls
    ``release()`` once it has sent one). Errors of the source (e.g. the exporter) reach the consumer."""

    def __init__(self, buckets: Iterable[Bucket], flattened: bool, device: torch.device, depth: int,
                 pool: StagingPool | None = None):
        self._slots = threading.Semaphore(depth)
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        cuda_device = torch.cuda.current_device() if device.type == "cuda" else None
        self._pool = pool
        self._thread = threading.Thread(target=self._run, args=(iter(buckets), flattened, device, cuda_device), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[Bucket], flattened: bool, device: torch.device, cuda_device: int | None) -> None:
        i = 0
        try:
            if cuda_device is not None:  # a new thread starts on GPU 0; stage where the sender's thread works
                torch.cuda.set_device(cuda_device)
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                bucket = next(it, _END)
                if bucket is _END:
                    self._q.put(_END)
                    return
                self._q.put(_stage(bucket, i, flattened, device, self._pool))
                del bucket
                i += 1
        except BaseException as exc:  # handed to the consumer, which raises it
            self._q.put(exc)

    def __iter__(self) -> Iterator[Staged]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        """Stop staging (after a failed push): the thread exits at its next slot."""
        self._stop.set()
        self._slots.release()


def stage_buckets(
    buckets: Iterable[Bucket], flattened: bool = True, device: torch.device | str = "cpu", overlap: bool = True,
    pool: StagingPool | None = None,
) -> Iterator[tuple[Staged, bool]]:
    """(staged bucket, is_last) pairs, as DistributedTransport sends them; ``overlap`` stages the next
    bucket in a background thread while the caller sends the current one (the caller must finish with a
    pair before asking for the one after next). ``pool``: flat CPU buffers to stage into; the caller calls
    ``staged.done()`` once a bucket is sent, and must not read its payload afterwards."""
    device = torch.device(device)
    if not overlap:
        yield from with_last(_stage(b, i, flattened, device, pool) for i, b in enumerate(buckets))
        return
    pre = _Prefetch(buckets, flattened, device, depth=3, pool=pool)  # with_last holds two; the third is being staged
    try:
        for pair in with_last(pre):
            yield pair
            pre.release()
    finally:
        pre.close()


def _parallel(fn, servers: Sequence[ServerControl]) -> None:
    """Call fn(server) for every server in threads; raise the first error naming its server."""
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        futures = [(s, pool.submit(fn, s)) for s in servers]
        errors = []
        for s, f in futures:
            try:
                f.result()
            except Exception as exc:
                errors.append(f"{s.url}: {exc}")
    if errors:
        raise ServerControlError("; ".join(errors))


class Transport:
    name = "base"
    needs_session = False  # wrap the pushes in begin_weight_update / end_weight_update

    def prepare(self, servers: Sequence[ServerControl]) -> None:
        """Called before pausing; e.g. (re)build a process group when the server set changed."""

    def push(self, servers: Sequence[ServerControl], buckets: Iterable[Bucket], version: str) -> TransportStats:
        raise NotImplementedError

    def close(self, servers: Sequence[ServerControl] = ()) -> None:
        """Release what prepare() built."""


def server_tp_sizes(tp_sizes: Sequence[int] | Mapping[str, int] | None, servers: Sequence[ServerControl], who: str) -> list[int]:
    """The TP size of each of ``servers``: 1 each, given in their order, or looked up by URL."""
    if tp_sizes is None:
        return [1] * len(servers)
    if isinstance(tp_sizes, Mapping):
        missing = [s.url for s in servers if s.url not in tp_sizes]
        if missing:
            raise ValueError(f"{who}.tp_sizes has no entry for {missing}")
        return [int(tp_sizes[s.url]) for s in servers]
    if len(tp_sizes) != len(servers):
        raise ValueError(f"{who}.tp_sizes has {len(tp_sizes)} entries for {len(servers)} servers")
    return list(tp_sizes)


class DistributedTransport(Transport):
    name = "distributed"
    needs_session = True

    def __init__(
        self,
        backend: str | None = None,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        flattened: bool = True,
        timeout_s: float = 300.0,
        tp_sizes: Sequence[int] | Mapping[str, int] | None = None,
        device: str | torch.device | None = None,
        overlap: bool = True,
        reuse_staging: bool = True,
    ):
        """backend None: nccl when CUDA is available, else gloo. tp_sizes: TP size of each server, in the
        servers' order or by URL (a fleet whose live servers change between syncs; default 1 each). device: where buckets are staged for the broadcast (default cuda for nccl).
        reuse_staging: keep the flat CPU staging buffers between syncs (StagingPool; up to 3 x the bucket
        size stays allocated on rank 0) instead of page-faulting fresh ones for every bucket."""
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.master_address = master_address
        self.master_port = master_port
        self.flattened = flattened
        self.overlap = overlap
        self.pool = StagingPool() if reuse_staging else None
        self.timeout_s = timeout_s
        self.tp_sizes = tp_sizes
        self.device = torch.device(device) if device is not None else torch.device("cuda" if self.backend == "nccl" else "cpu")
        self.pg = None
        self.group_name = ""
        self._members: tuple[str, ...] = ()

    def prepare(self, servers: Sequence[ServerControl]) -> None:
        members = tuple(s.url for s in servers)
        if self.pg is not None and members == self._members:
            return
        if self.pg is not None:  # server set changed (a restart, a new server): rebuild the group
            self.close([s for s in servers if s.url in self._members])
        tp = server_tp_sizes(self.tp_sizes, servers, "DistributedTransport")
        # rank 0's rendezvous waits for every rank until timeout_s: fail fast on a server that is not up
        down = [s.url for s in servers if not s.healthy(timeout_s=10)]
        if down:
            raise ServerControlError(f"cannot build the weight-update group: {down} not healthy (GET /health)")
        world = 1 + sum(tp)
        offsets = [1 + sum(tp[:k]) for k in range(len(servers))]
        store = host_update_store(self.master_address, self.master_port, world, self.timeout_s)
        port = store.port  # listening already: the servers cannot race another process for it
        name = f"minpro_wu_{uuid.uuid4().hex[:8]}"  # fresh name: a half-dead old group cannot collide
        # Servers block in their POST until rank 0 joins: start them in threads, then join as rank 0.
        errors: list[str] = []

        def join(s: ServerControl, off: int) -> None:
            try:
                s.init_weights_update_group(self.master_address, port, off, world, name, self.backend)
            except Exception as exc:
                errors.append(f"{s.url}: {exc}")

        threads = [threading.Thread(target=join, args=(s, off), daemon=True) for s, off in zip(servers, offsets)]
        for t in threads:
            t.start()
        try:
            self.pg = init_update_group(self.master_address, port, world, name, self.backend, 0, self.timeout_s, store=store)
        finally:
            for t in threads:
                t.join(timeout=self.timeout_s)
        if errors:
            destroy_update_group(self.pg)
            self.pg = None
            raise ServerControlError("init_weights_update_group failed: " + "; ".join(errors))
        self.group_name, self._members = name, members

    def push(self, servers: Sequence[ServerControl], buckets: Iterable[Bucket], version: str) -> TransportStats:
        if self.pg is None or tuple(s.url for s in servers) != self._members:
            raise RuntimeError("DistributedTransport.push before prepare() for this server set")
        stats = TransportStats()
        t0 = time.perf_counter()
        parts = dict.fromkeys(("stage wait", "broadcast", "server load"), 0.0)
        t_wait = time.perf_counter()
        for i, (staged, last) in enumerate(stage_buckets(buckets, self.flattened, self.device, self.overlap, self.pool)):
            parts["stage wait"] += time.perf_counter() - t_wait
            label = version if last else None
            names, dtypes, shapes, payload = staged.names, staged.dtypes, staged.shapes, staged.payload
            errors: list[str] = []

            def post(s: ServerControl) -> None:
                try:
                    s.update_weights_from_distributed(
                        names, dtypes, shapes, self.group_name, "flattened_bucket" if self.flattened else None, label
                    )
                except Exception as exc:
                    errors.append(f"{s.url}: {exc}")

            threads = [threading.Thread(target=post, args=(s,), daemon=True) for s in servers]
            for t in threads:
                t.start()
            t_b = time.perf_counter()
            for tensor in payload:  # same order as the receivers' broadcasts
                torch.distributed.broadcast(tensor, group=self.pg, group_src=0)
            t_j = time.perf_counter()
            for t in threads:
                t.join(timeout=self.timeout_s)
            parts["broadcast"] += t_j - t_b
            parts["server load"] += time.perf_counter() - t_j
            if errors or any(t.is_alive() for t in threads):
                raise ServerControlError(f"update_weights_from_distributed bucket {i} failed: {'; '.join(errors) or 'timeout'}")
            stats.bytes += sum(int(p.numel()) * p.element_size() for p in payload)
            staged.done()  # every server has received and loaded it: the staging buffer is free
            del staged, payload
            stats.buckets += 1
            stats.tensors += len(names)
            t_wait = time.perf_counter()
        stats.seconds = time.perf_counter() - t0
        stats.parts = parts
        return stats

    def close(self, servers: Sequence[ServerControl] = ()) -> None:
        if self.pool is not None:
            self.pool.clear()  # after a failure or at the end: give the staging memory back
        if self.pg is None:
            return
        for s in servers:
            try:
                s.destroy_weights_update_group(self.group_name)
            except Exception:  # a dead server cannot answer; its side of the group died with it
                pass
        destroy_update_group(self.pg)
        self.pg, self._members, self.group_name = None, (), ""


class DiskTransport(Transport):
    """Write the buckets as safetensors shards (one per bucket) + model.safetensors.index.json, copy the
    config/tokenizer files of ``template_dir``, then every server loads the directory."""

    name = "disk"
    needs_session = False
    _COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, root_dir: str | Path, template_dir: str | Path, keep_last: int = 2):
        self.root_dir = Path(root_dir)
        self.template_dir = Path(template_dir)
        if not (self.template_dir / "config.json").is_file():
            raise ValueError(
                f"DiskTransport.template_dir={str(template_dir)!r} has no config.json; pass the HF directory the "
                "servers were started from (its config and tokenizer are copied next to the new shards)"
            )
        self.keep_last = max(1, keep_last)
        self.written: list[Path] = []

    def write(self, buckets: Iterable[Bucket], version: str) -> tuple[Path, TransportStats]:
        from safetensors.torch import save_file

        stats = TransportStats()
        t0 = time.perf_counter()
        final = self.root_dir / f"step_{version}"
        tmp = self.root_dir / f".tmp_step_{version}_{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        shards: list[tuple[str, dict[str, torch.Tensor]]] = []
        for i, bucket in enumerate(buckets):
            validate_bucket(bucket, f"bucket {i}")
            shards.append((f"shard-{i:05d}", {n: t.detach().to("cpu").contiguous() for n, t in bucket}))
            stats.bytes += bucket_nbytes(bucket)
            stats.buckets += 1
            stats.tensors += len(bucket)
        weight_map: dict[str, str] = {}
        total = len(shards)
        for i, (stem, tensors) in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            for n in tensors:
                if n in weight_map:
                    raise ValueError(f"tensor {n!r} appears in two buckets; every HF name must be sent once")
                weight_map[n] = fname
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": stats.bytes}, "weight_map": weight_map}, indent=1)
        )
        for name in self._COPY:
            if (self.template_dir / name).is_file():
                shutil.copy2(self.template_dir / name, tmp / name)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # servers never see a half-written directory
        self.written.append(final)
        while len(self.written) > self.keep_last:
            shutil.rmtree(self.written.pop(0), ignore_errors=True)
        stats.seconds = time.perf_counter() - t0
        return final, stats

    def push(self, servers: Sequence[ServerControl], buckets: Iterable[Bucket], version: str) -> TransportStats:
        path, stats = self.write(buckets, version)
        t0 = time.perf_counter()
        _parallel(lambda s: s.update_weights_from_disk(str(path.resolve()), version), servers)
        stats.seconds += time.perf_counter() - t0
        return stats


class TensorTransport(Transport):
    """Colocated GPU servers only (see the module docstring for why not on CPU)."""

    name = "tensor"
    needs_session = True

    def __init__(self, tp_sizes: Sequence[int] | Mapping[str, int] | None = None, allow_cpu: bool = False):
        self.tp_sizes = tp_sizes
        self.allow_cpu = allow_cpu  # only for building payloads in tests; a CPU payload kills a real server

    @staticmethod
    def build_payload(bucket: Bucket, tp_size: int = 1) -> list[str]:
        """SGLang's ``serialized_named_tensors``: one base64 ForkingPickler string per server TP rank, each
        holding {"flattened_tensor": uint8, "metadata": [FlattenedTensorMetadata]} (load_format
        "flattened_bucket"). Every TP rank gets the same IPC handle of one flattened tensor."""
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        validate_bucket(bucket)
        if any(t.is_cuda for _, t in bucket):
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

            monkey_patch_torch_reductions()  # IPC handles name the GPU by UUID, not by local index
        # SGLang's FlattenedTensorBucket concatenates in the given order and its reconstruct_tensors() fails on a
        # tensor at a byte offset not divisible by its itemsize: order by descending itemsize (as FlatBucket).
        ordered = sorted(bucket, key=lambda nt: -nt[1].element_size())
        fb = FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in ordered])
        obj = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
        return [MultiprocessingSerializer.serialize(obj, output_str=True) for _ in range(tp_size)]

    def push(self, servers: Sequence[ServerControl], buckets: Iterable[Bucket], version: str) -> TransportStats:
        tp = server_tp_sizes(self.tp_sizes, servers, "TensorTransport")
        stats = TransportStats()
        t0 = time.perf_counter()
        for i, (bucket, last) in enumerate(with_last(buckets)):
            if not self.allow_cpu and not all(t.is_cuda for _, t in bucket):
                raise ValueError(
                    f"TensorTransport bucket {i} holds CPU tensors: a CPU ForkingPickler payload kills an SGLang "
                    "server. Use rollout.weight_transport=distributed (gloo) or disk on CPU hosts."
                )
            payloads = {tp_size: self.build_payload(bucket, tp_size) for tp_size in set(tp)}
            label = version if last else None
            for s, tp_size in zip(servers, tp):
                s.update_weights_from_tensor(payloads[tp_size], "flattened_bucket", label)
            stats.bytes += bucket_nbytes(bucket)
            stats.buckets += 1
            stats.tensors += len(bucket)
        stats.seconds = time.perf_counter() - t0
        return stats
