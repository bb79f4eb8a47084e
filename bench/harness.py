"""What the benchmark scripts share: the devices to run on, timing, random data, labels, and how much of the
device's arithmetic peak a timed call reached.

The scripts import it as a sibling module (``python bench/<script>.py`` puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def devices(choice: str) -> list[torch.device]:
    """``"cpu"``: the CPU; ``"cuda"``: the GPU (an error without one); ``"auto"``: the CPU, and the GPU too
    when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but not available")
    if choice == "cpu" or not torch.cuda.is_available():
        return [torch.device("cpu")]
    return [torch.device("cuda")] if choice == "cuda" else [torch.device("cpu"), torch.device("cuda")]


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read after it is fair."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_calls(fns: Sequence[Callable[[], object]], dev: torch.device, repeats: int,
               stat: Callable[[list[float]], float] = statistics.median, min_sample_s: float = 0.05) -> list[float]:
    """``stat`` of each function's samples from ``time_samples`` (seconds per call)."""
    return [stat(acc) for acc in time_samples(fns, dev, repeats, min_sample_s)]


def paired_ratio(samples: Sequence[Sequence[float]], num: int, den: int) -> float:
    """The median over rounds of ``samples[num][r] / samples[den][r]`` (> 1: function ``den`` is faster): two
    functions timed in the same round met the same load, so their ratio is steadier than a ratio of two
    best-of or median times taken over the whole run (which drifts on a shared machine)."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def time_samples(fns: Sequence[Callable[[], object]], dev: torch.device, repeats: int,
                 min_sample_s: float = 0.05) -> list[list[float]]:
    """Seconds per call of each function: one untimed warm-up call of each (allocator, kernels, lazy init),
    then ``repeats`` timed samples of each, interleaved round-robin with the order rotated every round (a load
    change on a shared machine hits every function alike, and none is always timed right after the same one),
    returned per function, one sample per round (seconds per call). A function whose warm-up call took under
    ``min_sample_s`` is called several times per sample (enough to fill it, the same count in every sample),
    so that a millisecond call is not timed at the clock's and the scheduler's grain."""
    inner = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        sync(dev)
        inner.append(max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-6))))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for j in range(len(fns)):
            i = (r + j) % len(fns)  # each round starts one further along: no function is always timed last
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fns[i]()
            sync(dev)
            times[i].append((time.perf_counter() - t0) / inner[i])
    return times


def counted_flops(fn: Callable[[], object]) -> float:
    """The floating-point operations of one call of ``fn``: its matrix products and convolutions, forward and
    backward, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (element-wise operations, reductions
    and the work outside torch, e.g. an assignment solver, are not counted). Runs ``fn`` once."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


_PEAK: dict[tuple[str, torch.dtype, bool], float] = {}


def matmul_peak(dev: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """This device's measured arithmetic peak in FLOP/s for ``dtype``: the best of five timed products of two
    square matrices (4096 on CUDA, 1024 on the CPU, with torch's current threads and, on CUDA, its current
    TF32 setting), measured once per process. A measured peak, not the vendor's figure: the fraction of it a
    benchmark reaches says how far that workload is from what a plain large GEMM gets on the same device."""
    tf32 = dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    key = (str(dev), dtype, tf32)
    if key not in _PEAK:
        n = 4096 if dev.type == "cuda" else 1024
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g, dtype=dtype).to(dev) for _ in range(2))
        (t,) = time_calls([lambda: a @ b], dev, 5, stat=min)
        _PEAK[key] = 2.0 * n**3 / t
    return _PEAK[key]


def peak_line(case: str, dev: torch.device, flops: float, seconds: float, dtype: torch.dtype = torch.float32) -> str:
    """The line a benchmark prints for the fraction of the device's peak a call reached (``python -m bench``
    collects every ``peak:`` line into a table): ``flops`` (``counted_flops``) done in ``seconds``."""
    rate, peak = flops / seconds, matmul_peak(dev, dtype)
    name = str(dtype).removeprefix("torch.")
    return (f"peak: [{case}, {device_label(dev)}]: {rate / 1e9:.1f} GFLOP/s = {100 * rate / peak:.1f}% of the "
            f"measured {name} matmul peak ({peak / 1e9:.0f} GFLOP/s)")


def random_task(n: int, shape: Sequence[int], n_cls: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` standard-normal inputs of ``shape`` and uniformly random labels in ``[0, n_cls)``, drawn from ``g``
    (on the CPU, float32)."""
    return torch.randn(n, *shape, generator=g), torch.randint(0, n_cls, (n,), generator=g)


def device_label(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def versions() -> str:
    """The line every benchmark prints first: torch's version, the CPU threads, the GPU if any."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))


def bench_parser(doc: str | None, *, repeats: int = 5, device: str = "auto") -> argparse.ArgumentParser:
    """The command line every benchmark shares: ``--device`` (``devices``), ``--repeats`` (timed samples) and
    ``--tiny`` (toy sizes that only check the script runs, as ``python -m bench --tiny`` and CI call it);
    described by the first line of ``doc``. The script adds its own options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    p.add_argument("--device", default=device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--tiny", action="store_true", help="toy sizes that only check the script runs (python -m bench)")
    return p


def training_parser(doc: str, *, n: int, width: int, repeats: int, epochs: int = 3,
                    batch_size: int = 128) -> argparse.ArgumentParser:
    """The command line of a training benchmark (described by the first line of ``doc``) with its workload's
    options and their defaults: ``--epochs``, ``--n`` (random training examples), ``--width`` (hidden units),
    ``--batch-size``, ``--repeats`` (timed runs; the best is reported). The script adds its own options."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--n", type=int, default=n, help=f"training examples (default: {n})")
    ap.add_argument("--width", type=int, default=width)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--repeats", type=int, default=repeats, help="timed repetitions; the best is reported")
    return ap
