"""Computing chunks on a device (a CUDA GPU, or the CPU through the same machinery).

The executor's jobs stay what they are: each reads its input chunks through
``Checkpoint.read_chunk`` and computes its output chunk. ``TaskVector.on_device`` wraps the
checkpoints they read so that a chunk arrives on the device: copied from the
file's pages into a pinned (page-locked) host buffer, then to the device with a
non-blocking copy on a copy stream, while the job computing the previous chunk
runs on its own compute stream; each checkpoint also starts the copy of the chunk
after the one just asked for, so the next job's inputs are in flight while this one
computes. ``DeviceRunner.run`` runs a job on the compute stream and brings its result
back to a pinned host buffer for the writer.

With ``device: cpu`` the same wrappers and job path run, the copies being the
identity; tests exercise the machinery that way. On a GPU, ``task_arithmetic``
gives the CPU's bits (the same IEEE float32 additions, element by element); the
other methods agree with the CPU to 1e-6 (reductions may sum in another order).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from mlflow_taskvec.engine.checkpoint import Checkpoint
from mlflow_taskvec.engine.io import TensorSpec
from mlflow_taskvec.errors import TaskVecError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def device_name(value: "str | torch.device", what: str = "device") -> str:
    """``value`` checked to be ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (whether or not this
    machine has it), in lower case."""
    text = str(value).strip().lower()
    if text in ("cpu", "cuda", "auto") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise TaskVecError(f"{what}: {value!r} is not one of {DEVICE_CHOICES}")


def parse_device(value: "str | torch.device | None", what: str = "device") -> torch.device | None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else the CPU) as a
    ``torch.device``; ``None`` stays ``None`` (the default streaming executor).
    Raises one line when the device does not exist on this machine."""
    if value is None:
        return None
    text = device_name(value, what)
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(text)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "but no CUDA GPU is visible"
        raise TaskVecError(f"{what}: {value!r} needs a CUDA GPU, and this torch {torch.__version__} is {build} (use cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TaskVecError(f"{what}: {value!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class DeviceRunner:
    """Streams and host buffers for one device; on the CPU every step is the identity."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._compute_streams = threading.local()  # one per worker thread

    # -- host -> device ---------------------------------------------------------
    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start copying ``host`` to the device; returns (device tensor, copy event)."""
        if not self.cuda:
            return host, None
        staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staged.copy_(host)
        with torch.cuda.stream(self._copy_stream):
            on_device = staged.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return on_device, done

    def arrive(self, on_device: torch.Tensor, done) -> torch.Tensor:
        """Make the current (compute) stream wait for an upload before using its tensor."""
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            on_device.record_stream(stream)  # its memory stays reserved until this stream is done with it
        return on_device

    # -- running a job ----------------------------------------------------------
    def _stream(self):
        if not self.cuda:
            return contextlib.nullcontext()
        stream = getattr(self._compute_streams, "stream", None)
        if stream is None:
            stream = self._compute_streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def run(self, job) -> torch.Tensor:
        """Run ``job`` on this thread's compute stream; its result, back on the host."""
        with self._stream():
            result = job()
            if not self.cuda or result.device.type == "cpu":
                return result
            host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
            host.copy_(result, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        done.synchronize()
        return host


class DeviceCheckpoint(Checkpoint):
    """A checkpoint whose ``read_chunk`` returns chunks on the device, prefetching the next chunk."""

    def __init__(self, inner: Checkpoint, runner: DeviceRunner):
        self.inner, self.runner = inner, runner
        self.source = inner.source
        self._ahead: dict[tuple, tuple[torch.Tensor, object]] = {}
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        return self.inner.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def spec(self, name: str) -> TensorSpec:
        return self.inner.spec(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.inner.get_tensor(name)  # whole tensors (diagnostics) stay on the host

    def raw_bytes(self, name: str) -> memoryview:
        return self.inner.raw_bytes(name)

    def metadata(self) -> dict[str, str]:
        return self.inner.metadata()

    def fingerprint(self, fresh: bool = False) -> str:
        return self.inner.fingerprint(fresh)

    def read_chunk(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, start, stop)
        with self._lock:
            staged = self._ahead.pop(key, None)
        if staged is None:
            staged = self._upload(name, start, stop)
        numel = self.inner.spec(name).numel
        if stop < numel:  # the next job will want the next chunk: start its copy now
            after = (name, stop, min(numel, stop + (stop - start)))
            with self._lock:
                if after not in self._ahead:
                    self._ahead[after] = self._upload(*after)
                while len(self._ahead) > 4:  # a chunk nobody asked for (another chunking): drop the oldest
                    self._ahead.pop(next(iter(self._ahead)))
        return self.runner.arrive(*staged).to(dtype)

    def _upload(self, name: str, start: int, stop: int):
        # in the stored dtype: a 16-bit input crosses the bus at half the bytes, and is widened there
        return self.runner.upload(self.inner.read_chunk(name, start, stop, self.inner.spec(name).dtype))
