"""Benchmark of record for one EM iteration (E-step + M-step): time, throughput, memory, accuracy, energy.

Sweeps N x K x D (default N in {1e5, 1e6, 1e7}, K in {256, 1024, 4096, 16384}, D in {96, 128, 960}) for
diag and spherical models and compares, on the same data and parameters, in one run:

* ``ours (<precision>)``: the fused Triton E-step (``flashgmm_ivf.kernels.estep``) in the
  estimator's blocks of ``chunk_size`` rows, plus the float64 M-step;
* ``torch chunked TF32``: the torch reference in float32, 65,536 rows at a time, TF32 matmuls;
* ``torch materialised N x K``: the torch reference over all N rows at once (where it fits in memory);
* with ``--anchor-dir``: IBM's Flash-GMM kernels (GitHub IBM/Flash-GMM, imported from that folder,
  never copied here), each with the M-step of its README.

Columns: median ms per EM iteration; achieved TFLOP/s (model flop: 12 N K D diag, 6 N K D spherical)
and its fraction of the torch.matmul ceiling measured in the same run, both for the tensor-core
format the method's products run in and for bf16 (the card's fastest); peak GPU memory above the
input; joules per iteration (NVML energy counter over the timed repetitions, or power sampling
where the counter is unsupported); relative error of the statistics and max |log Z| error against
a float64 E-step of the same parameters.

Large cells cost: each method gets a warm-up (also its accuracy run where the float64 oracle fits
``--oracle-max-flop``) and timed repetitions filling ``--window-s`` (at least one). A method whose
iteration is predicted (from its throughput on the smaller cells, run first) to exceed
``--max-method-s``, or to overrun ``--budget-s`` for the whole run, is skipped and says so; so is
the materialised variant where N x K does not fit, and IBM's kernels (autotuned afresh at every N)
above ``--anchor-max-flop``. The JSON is rewritten after every cell.

Data: SIFT-like raw-scale rows (integers 0..255 drawn around random cluster centres), float32.
Run: ``python -m flashgmm_ivf.eval.bench_estep --out eval/results/bench_estep.json``; on a machine
without CUDA the torch methods run on the CPU (a smoke test of the harness).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from flashgmm_ivf.eval.environment import environment

from flashgmm_ivf import GaussianMixture, kernels
from flashgmm_ivf._mstep import m_step
from flashgmm_ivf.mixture import CACHED_KERNEL_BLOCK

GRID = {"n": (100_000, 1_000_000, 10_000_000), "k": (256, 1024, 4096, 16384), "d": (96, 128, 960)}
TORCH_CHUNK = 65536
# Rows per E-step call, as GaussianMixture reads data it keeps on the GPU (cache_data): blocks of
# at least CACHED_KERNEL_BLOCK rows.
CHUNK = max(inspect.signature(GaussianMixture).parameters["chunk_size"].default, CACHED_KERNEL_BLOCK)
# Model flop per N K D: logits twice (pass 1 and pass 2: x and x^2 products for diag) and the statistics once.
FLOP_PER_NKD = {"diag": 12, "spherical": 6}
# Matmul ceilings: which one a method's products run at.
CEILINGS = ("bf16", "tf32", "fp32")
# The N=10M memory bar: peak above the input within 64 MB.
MEMORY_BAR_MIB = 64 * 10**6 / 2**20
# Torch methods need no compilation: past this predicted time their warm-up is skipped.
TORCH_WARMUP_MAX_S = 0.5


def sift_like(d, clusters, gen, device):
    """A source of SIFT-like rows: ``draw(m)`` gives m more float32 rows, integers in 0..255 around
    the same ``clusters`` random centres (SIFT's scale and spread)."""
    centres = torch.rand(clusters, d, generator=gen, device=device) * 120
    spread = 5 + torch.rand(clusters, d, generator=gen, device=device) * 25

    def draw(m):
        label = torch.randint(clusters, (m,), generator=gen, device=device)
        noise = torch.randn(m, d, generator=gen, device=device)
        return (centres[label] + noise * spread[label]).round_().clamp_(0, 255)
    return draw


def raw_scale_rows(n, d, clusters, gen, device):
    """(n, d) float32 integers in 0..255 around ``clusters`` centres: SIFT-like scale and spread."""
    draw = sift_like(d, clusters, gen, device)
    x = torch.empty(n, d, device=device)
    for start in range(0, n, 1 << 20):
        x[start:start + min(1 << 20, n - start)] = draw(min(1 << 20, n - start))
    return x


def starting_params(x, k, covariance_type, gen):
    """Means at random rows, variances a quarter of the data's: realistic, moderately peaked posteriors."""
    x64 = x[: min(len(x), 200_000)].double()
    shift = x64.mean(0).float().double()
    means = x[torch.randint(len(x), (k,), generator=gen, device=x.device)].double() - shift
    var = x64.var(0) / 4
    var = var.expand(k, -1).clone() if covariance_type == "diag" else var.mean().expand(k).clone()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=x.device)
    return weights, means, var, shift


def em_iteration(estep, x, weights, means, var, shift, covariance_type):
    stats = estep(x, kernels.natural_params(weights, means, var), shift)
    return float(stats.log_norm.sum()), m_step(stats, covariance_type, 1e-6)


# ---------------------------------------------------------------------- timing and energy
def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock elsewhere."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_ms(fn, repeat):
    """Median and all of ``repeat`` timed calls after one warm-up call."""
    fn()
    _synchronize()
    times = [_timed(fn) for _ in range(repeat)]
    return statistics.median(times), times


class EnergyMeter:
    """Joules the GPU drew between :meth:`start` and :meth:`stop`, from NVML.

    The total-energy counter (mJ, Volta and later) where the driver supports it; otherwise
    the power reading sampled every ``period_s`` by a thread and integrated. ``method`` is
    None (and :meth:`stop` returns None) for a CPU ``device`` or without nvidia-ml-py.
    """

    def __init__(self, device: torch.device, period_s=0.005):
        self.method, self.error, self._handle, self._period = None, None, None, period_s
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
        except Exception as error:  # noqa: BLE001 - any NVML trouble means "no energy column"
            self.error = f"{type(error).__name__}: {error}"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self.method = "nvml total energy counter"
        except pynvml.NVMLError:
            self.method = f"nvml power sampling every {period_s * 1e3:g} ms"

    def start(self):
        if self.method is None:
            return
        torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        if self._sampling():
            self._samples, self._stop = [], threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._mj0 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def stop(self):
        """Joules since :meth:`start`; None without NVML, or when the energy counter did not
        move (a window shorter than the driver's update period of the counter)."""
        if self.method is None:
            return None
        torch.cuda.synchronize()
        if not self._sampling():
            millijoules = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._mj0
            return millijoules / 1e3 if millijoules > 0 else None
        self._stop.set()
        self._thread.join()
        samples = self._samples or [(time.perf_counter(), self._watts())]
        elapsed = time.perf_counter() - self._t0
        return statistics.fmean(w for _, w in samples) * elapsed

    def _sampling(self):
        return self.method.startswith("nvml power")

    def _watts(self):
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3

    def _sample(self):
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), self._watts()))
            time.sleep(self._period)


def _nvml_index() -> int:
    """NVML's index of torch's current device (NVML ignores CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    current = torch.cuda.current_device()
    return int(visible[current]) if current < len(visible) and visible[current].strip().isdigit() else current


@contextlib.contextmanager
def tf32(enabled):
    """TF32 matmuls in torch on or off inside the block."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_ceilings(size, device, repeat=10):
    """TFLOP/s of a size^3 torch.matmul in bf16, TF32 and plain float32, median of ``repeat``."""
    out = {}
    for name, dtype, allow_tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                    ("fp32", torch.float32, False)):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        with tf32(allow_tf32):
            ms, _ = time_ms(lambda a=a, b=b: torch.matmul(a, b), repeat)
        out[name] = 2 * size**3 / ms / 1e9
    return out


# ---------------------------------------------------------------------- the methods
class Cell:
    """One (N, K, D, covariance type): data, starting parameters and the float64 oracle."""

    def __init__(self, n, k, d, covariance_type, device, seed=0, x=None):
        """``x``: rows of shape (n, d) to take instead of drawing them."""
        # Seeded per (N, K, D), so a subset of the grid reproduces the full run's data.
        gen = torch.Generator(device).manual_seed(seed + 1_000_003 * n + 1009 * k + d)
        self.n, self.k, self.d, self.covariance_type = n, k, d, covariance_type
        self.x = raw_scale_rows(n, d, 256, gen, device) if x is None else x
        self.weights, self.means, self.var, self.shift = starting_params(self.x, k, covariance_type, gen)
        self.params = kernels.natural_params(self.weights, self.means, self.var)
        self.flop = FLOP_PER_NKD[covariance_type] * n * k * d

    def iteration(self, estep, x=None):
        return em_iteration(estep, self.x if x is None else x, self.weights, self.means, self.var, self.shift,
                            self.covariance_type)


class Method(NamedTuple):
    """A way to run one EM iteration, and its statistics for the accuracy check.

    ``statistics(keep_rows)`` returns an EStepResult in the method's own convention;
    ``convention`` maps the float64 oracle (ours) to it.
    """

    name: str
    ceiling: str
    iteration: Callable[[], object]
    statistics: Callable[[], kernels.EStepResult]
    convention: Callable[[kernels.EStepResult], kernels.EStepResult] = lambda ref: ref
    compiled: bool = True                 # Triton: warm up at every new shape
    needs_bytes: int = 0                  # transient memory; skipped where it does not fit


# "<precision>-fused": that precision by the fused Triton kernels at any D (their default
# launch settings), where the default runs wide rows as library products (``kernels.gemm``).
FUSED = "-fused"


def blocked_estep(precision, configs, keep_rows):
    """Our E-step as GaussianMixture runs it on data cached on the GPU: blocks of ``CHUNK`` rows, statistics summed.

    ``keep_rows`` keeps every row's log Z (for the accuracy check only: an EM iteration, like
    GaussianMixture, keeps just its sum). ``precision`` may end in ``FUSED``. "candidates" keeps
    each block's best components between calls, as GaussianMixture does between EM iterations
    (the first call ranks them with a "bf16" pass 1)."""
    hints = {}

    def options(d, diagonal):
        if precision.endswith(FUSED):
            base = precision[:-len(FUSED)]
            return {"precision": base, "configs": configs or kernels.default_configs(d, diagonal, base)}
        return {"precision": precision} | ({"configs": configs} if configs else {})

    def run(x, p, s):
        log_norms, total = [], None
        opts = options(x.shape[1], p.diagonal)
        for i in range(0, len(x), CHUNK):
            chunk = x[i:i + CHUNK]
            candidates = opts["precision"] == "candidates"
            extra = {"hints": kernels.candidate_hints(hints, i, chunk, p, s)} if candidates else {}
            r = kernels.estep(chunk, p, s, **opts, **extra)
            log_norms.append(r.log_norm if keep_rows else r.log_norm.sum(0, keepdim=True))
            total = list(r[1:]) if total is None else [t.add_(u) for t, u in zip(total, r[1:])]
        return kernels.EStepResult(torch.cat(log_norms), *total)
    return run


def _torch_reference(chunk, allow_tf32):
    def run(x, p, s):
        with tf32(allow_tf32):
            return kernels.reference.estep(x, p, s, dtype=torch.float32, chunk_size=chunk or len(x))
    return run


def our_methods(cell, precisions, configs, uint8):
    methods = []
    for precision in precisions:
        bf16 = precision.startswith("bf16") or precision == "candidates"
        ceiling = "bf16" if bf16 else "fp32" if precision == "ieee" else "tf32"
        # One blocked E-step per method, called every iteration: "candidates" keeps its rows' best
        # components between calls, as GaussianMixture does between EM iterations.
        methods.append(Method(
            f"ours ({precision})", ceiling, lambda run=blocked_estep(precision, configs, False): cell.iteration(run),
            lambda p=precision: blocked_estep(p, configs, True)(cell.x, cell.params, cell.shift)))
    if uint8 and precisions:
        x8 = cell.x.to(torch.uint8)
        p = precisions[0]
        run = blocked_estep(p, configs, False)
        methods.append(Method(
            f"ours ({p}, uint8 input)", methods[0].ceiling, lambda: cell.iteration(run, x8),
            lambda: blocked_estep(p, configs, True)(x8, cell.params, cell.shift)))
    return methods


def torch_methods(cell):
    def method(name, chunk, allow_tf32, ceiling):
        return Method(name, ceiling, lambda: cell.iteration(_torch_reference(chunk, allow_tf32)),
                      lambda: _torch_reference(chunk, allow_tf32)(cell.x, cell.params, cell.shift),
                      compiled=False,
                      # ll, its exponent, the responsibilities and one more (N, K) temporary; [x, x^2].
                      needs_bytes=4 * 4 * min(chunk or cell.n, cell.n) * (cell.k + 3 * cell.d))
    return [method("torch chunked TF32", TORCH_CHUNK, True, "tf32"),
            method("torch materialised N x K", None, False, "fp32")]


# ---------------------------------------------------------------------- IBM Flash-GMM anchors
ANCHORS = {  # covariance type: (file, function, label, ceiling)
    "spherical": (("flash_gmm.py", "flash_gmm_estep", "IBM Flash-GMM portable (isotropic)", "tf32"),
                  ("flash_gmm_h100.py", "flash_gmm_estep", "IBM Flash-GMM H100 (isotropic, bf16)", "bf16")),
    "diag": (("flash_gmm_diag_h100.py", "flash_gmm_estep_diag", "IBM Flash-GMM H100 (diag, bf16)", "bf16"),),
}


def load_anchors(folder):
    """IBM's entry points found in ``folder``: {covariance type: [(label, ceiling, function)]}."""
    found = {}
    for cov, entries in ANCHORS.items():
        for file, function, label, ceiling in entries:
            path = Path(folder) / file
            if not path.exists():
                print(f"anchor {path} absent: {label} not timed")
                continue
            spec = spec_from_file_location(f"_anchor_{path.stem}", path)
            module = module_from_spec(spec)
            spec.loader.exec_module(module)
            found.setdefault(cov, []).append((label, ceiling, getattr(module, function)))
    return found


def anchor_methods(cell, anchors):
    """IBM's E-step on the raw float32 rows, its README's M-step, and the oracle in its convention:
    (log Z, N_k, sum r x, sum r (x - mu_k)^2 per feature (diag) or summed (isotropic))."""
    mu = (cell.means + cell.shift).float()
    log_var, log_pi = cell.var.log().float(), cell.weights.log().float()
    per_feature = 1 if cell.covariance_type == "diag" else cell.d

    def convention(ref):
        m = cell.means
        centred = ref.s2 - 2 * m * ref.s1 + m * m * ref.nk[:, None] if cell.covariance_type == "diag" else \
            ref.s2 - 2 * (m * ref.s1).sum(1) + (m * m).sum(1) * ref.nk
        return kernels.EStepResult(ref.log_norm, ref.nk, ref.s1 + ref.nk[:, None] * cell.shift, centred)

    def methods_for(label, ceiling, function):
        # The portable kernel takes the feature tile as an argument (its README: raise it for D > 128).
        tile = {"BLOCK_D": max(128, triton.next_power_of_2(cell.d))} \
            if "BLOCK_D" in inspect.signature(function).parameters else {}

        def estep():
            return function(cell.x, mu, log_var, log_pi, **tile)

        def statistics():
            return kernels.EStepResult(*estep())

        def iteration():
            log_z, nk, mu_acc, sig_acc = estep()
            nk = nk + 1e-10
            var = sig_acc / (per_feature * (nk[:, None] if sig_acc.dim() == 2 else nk))
            return float(log_z.sum()), (nk / cell.n).log(), mu_acc / nk[:, None], var.clamp_min(1e-6).log()
        return Method(label, ceiling, iteration, statistics, convention)
    return [methods_for(*entry) for entry in anchors.get(cell.covariance_type, [])]


# ---------------------------------------------------------------------- one cell
def relative_errors(got, ref):
    rel = {name: float((g.double() - r).norm() / r.norm()) for name, g, r in
           zip(("nk", "s1", "s2"), got[1:], ref[1:])}
    rel["log_z_max_abs"] = float((got.log_norm.double() - ref.log_norm).abs().max())
    return rel


class Runner:
    """Runs the methods of every cell within the limits; remembers throughputs to predict costs."""

    def __init__(self, args, ceilings, meter, device):
        self.args, self.ceilings, self.meter, self.device = args, ceilings, meter, device
        self.started = time.perf_counter()
        self.rate = {}   # (method, covariance type) -> seconds per model flop at the last measured cell

    def elapsed(self):
        return time.perf_counter() - self.started

    def skip_reason(self, method, cell):
        if method.name.startswith("IBM") and cell.flop > self.args.anchor_max_flop:
            return f"anchor not run above {self.args.anchor_max_flop:.0e} flop (its autotuning at every N)"
        if self.device.type == "cuda" and method.needs_bytes > 0.9 * torch.cuda.mem_get_info()[0]:
            return f"needs ~{method.needs_bytes / 2**30:.0f} GiB, more than is free"
        rate = self.rate.get((method.name, cell.covariance_type))
        if rate is None:
            return None
        predicted = rate * cell.flop
        if predicted > self.args.max_method_s:
            return f"predicted {predicted:.1f} s per iteration > --max-method-s {self.args.max_method_s:g}"
        if self.elapsed() + 2 * predicted + self.args.window_s > self.args.budget_s:
            return f"predicted {predicted:.1f} s per iteration would overrun --budget-s {self.args.budget_s:g}"
        return None

    def run(self, method, cell, ref):
        row = {"method": method.name, "covariance_type": cell.covariance_type, "n": cell.n, "k": cell.k,
               "d": cell.d, "status": "ok"}
        reason = self.skip_reason(method, cell)
        if reason:
            return row | {"status": "skipped", "reason": reason}
        try:
            row |= self._measure(method, cell, ref)
        except Exception as error:  # noqa: BLE001 - one cell's failure (OOM, IBM's asserts) must not end the sweep
            first_line = (str(error).splitlines() or [""])[0][:200]
            row |= {"status": "failed", "reason": f"{type(error).__name__}: {first_line}"}
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def _measure(self, method, cell, ref):
        out = {}
        rate = self.rate.get((method.name, cell.covariance_type))
        if ref is not None:
            # The accuracy run doubles as the warm-up (same kernels, one more output).
            got = method.statistics()
            out["relative_error"] = relative_errors(got, method.convention(ref))
            del got
        elif method.compiled or rate is None or rate * cell.flop < TORCH_WARMUP_MAX_S:
            method.iteration()
        _synchronize()
        baseline = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.meter.start()
        window_start = time.perf_counter()
        times = [_timed(method.iteration)]
        repeats = min(self.args.max_repeat, max(1, math.ceil(self.args.window_s / (times[0] / 1e3))))
        times += [_timed(method.iteration) for _ in range(repeats - 1)]
        joules = self.meter.stop()
        window = time.perf_counter() - window_start
        median = statistics.median(times)
        self.rate[(method.name, cell.covariance_type)] = median / 1e3 / cell.flop
        tflops = cell.flop / median / 1e9
        out |= {"ms_per_iteration": median, "ms_all": times, "repeats": len(times), "tflops": tflops,
                "ceiling": method.ceiling, "fraction_of_ceiling": tflops / self.ceilings[method.ceiling],
                "fraction_of_bf16_ceiling": tflops / self.ceilings["bf16"],
                "joules_per_iteration": None if joules is None else joules / len(times),
                "mean_power_w": None if joules is None else joules / window, "energy_window_s": window}
        if self.device.type == "cuda":
            out["peak_mib_above_input"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        return out


def bench_cell(runner, cell, precisions, configs, anchors):
    args = runner.args
    ref = None
    if cell.flop <= args.oracle_max_flop:
        ref = kernels.reference.estep(cell.x, cell.params, cell.shift, dtype=torch.float64)
    methods = our_methods(cell, precisions, configs, args.uint8) + anchor_methods(cell, anchors) + torch_methods(cell)
    rows = []
    for method in methods:
        row = runner.run(method, cell, ref)
        if ref is None:
            row["relative_error"] = None
            row["oracle"] = f"skipped: {cell.flop:.1e} flop > --oracle-max-flop {args.oracle_max_flop:.0e}"
        rows.append(row)
    return rows


def memory_at_scale(n, k, d, configs, gen):
    """Peak GPU memory of our EM iteration above the float32 input, at large N."""
    x = raw_scale_rows(n, d, 256, gen, "cuda")
    weights, means, var, shift = starting_params(x, k, "diag", gen)
    torch.cuda.synchronize()
    input_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    em_iteration(blocked_estep("bf16x3", configs, False), x, weights, means, var, shift, "diag")
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - input_bytes) / 2**20
    return {"n": n, "k": k, "d": d, "input_mib": n * d * 4 / 2**20, "peak_mib_above_input": peak,
            "bar_mib": MEMORY_BAR_MIB, "met": peak <= MEMORY_BAR_MIB}


# ---------------------------------------------------------------------- report
def _cell_text(value, fmt, width):
    return f"{'':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def print_table(rows, header=True):
    line = (f"{'cov':9} {'N':>9} {'K':>6} {'D':>4} {'method':38} {'ms/iter':>9} {'TFLOP/s':>8} {'%ceil':>6} "
              f"{'%bf16':>6} {'MiB':>7} {'J/iter':>8} {'err N_k':>8} {'err S1':>8} {'err S2':>8} {'|dlogZ|':>8}")
    if header:
        print(line)
        print("-" * len(line))
    for r in rows:
        head = f"{r['covariance_type']:9} {r['n']:>9,} {r['k']:>6} {r['d']:>4} {r['method'][:38]:38}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}: {r['reason']}")
            continue
        e = r.get("relative_error") or {}
        print(f"{head} {r['ms_per_iteration']:9.2f} {r['tflops']:8.1f} {100 * r['fraction_of_ceiling']:5.1f}% "
              f"{100 * r['fraction_of_bf16_ceiling']:5.1f}% {_cell_text(r.get('peak_mib_above_input'), '.0f', 7)} "
              f"{_cell_text(r['joules_per_iteration'], '.3g', 8)} {_cell_text(e.get('nk'), '.1e', 8)} "
              f"{_cell_text(e.get('s1'), '.1e', 8)} {_cell_text(e.get('s2'), '.1e', 8)} "
              f"{_cell_text(e.get('log_z_max_abs'), '.1e', 8)}")


def write_json(path, doc):
    """Write a benchmark's JSON document, making its folder if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _sizes(text):
    return [int(float(v)) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default=",".join(map(str, GRID["n"])), help="comma-separated; 1e6 is accepted")
    parser.add_argument("--k", default=",".join(map(str, GRID["k"])))
    parser.add_argument("--d", default=",".join(map(str, GRID["d"])))
    parser.add_argument("--covariance-types", default="diag,spherical")
    parser.add_argument("--precisions", default="bf16x3",
                        help="ours, comma-separated (bf16x3,tf32x3,ieee,tf32,bf16,candidates; "
                             f"bf16x3{FUSED}, bf16{FUSED})")
    parser.add_argument("--uint8", action="store_true", help="also ours on uint8 rows (first precision)")
    parser.add_argument("--anchor-dir", help="folder with IBM Flash-GMM's flash_gmm*.py (outside the repo)")
    parser.add_argument("--anchor-max-flop", type=float, default=2e12)
    parser.add_argument("--oracle-max-flop", type=float, default=2e13, help="float64 oracle up to this model flop")
    parser.add_argument("--window-s", type=float, default=0.3, help="timed (and metered) seconds per method")
    parser.add_argument("--max-repeat", type=int, default=200)
    parser.add_argument("--max-method-s", type=float, default=15.0)
    parser.add_argument("--budget-s", type=float, default=360.0, help="wall seconds for the whole sweep")
    parser.add_argument("--ceiling-size", type=int, help="M = N = K of the matmul ceilings (8192 on CUDA, 512 on CPU)")
    parser.add_argument("--memory-n", type=int, default=10_000_000, help="N of the peak-memory check (0: skip)")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory check (K=1024, D=128)")
    parser.add_argument("--configs", help="JSON from tune_estep (pass1, pass2 launch configs); default: built-in")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="eval/results/bench_estep.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    configs = None
    if args.configs:
        with open(args.configs) as f:
            tuned = json.load(f)
        configs = (kernels.LaunchConfig(**tuned["pass1"]), kernels.LaunchConfig(**tuned["pass2"]))
    result = {"environment": environment(device), "arguments": vars(args),
              "launch_configs": None if configs is None else [c._asdict() for c in configs], "rows": []}

    def write():
        write_json(args.out, result)

    if not args.memory_only:
        meter = EnergyMeter(device)
        result["energy_method"], result["energy_error"] = meter.method, meter.error
        size = args.ceiling_size or (8192 if device.type == "cuda" else 512)
        result["matmul_ceilings_tflops"] = ceilings = matmul_ceilings(size, device)
        print("matmul ceilings (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items())
              + f"; energy: {meter.method}")
        anchors = load_anchors(args.anchor_dir) if args.anchor_dir else {}
        runner = Runner(args, ceilings, meter, device)
        cells = sorted(((n, k, d, cov) for n in _sizes(args.n) for k in _sizes(args.k) for d in _sizes(args.d)
                        for cov in filter(None, args.covariance_types.split(","))),
                       key=lambda c: (c[0] * c[1] * c[2], c[3]))
        precisions = [p for p in args.precisions.split(",") if p]
        for cell_index, (n, k, d, cov) in enumerate(cells):
            cell = Cell(n, k, d, cov, device)
            rows = bench_cell(runner, cell, precisions, configs, anchors)
            del cell
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next cell's rows may need the whole card
            result["rows"] += rows
            print_table(rows, header=cell_index == 0)
            print(f"[{runner.elapsed():.0f} s]", flush=True)
            write()
        print("\nall cells:")
        print_table(result["rows"])
    if args.memory_n and device.type == "cuda":
        gen = torch.Generator("cuda").manual_seed(0)
        torch.cuda.empty_cache()
        memory = result["memory_at_scale"] = memory_at_scale(args.memory_n, 1024, 128, configs, gen)
        print(f"\npeak GPU memory of ours at N={memory['n']:,}: input {memory['input_mib']:.0f} MiB "
              f"+ {memory['peak_mib_above_input']:.1f} MiB (bar {MEMORY_BAR_MIB:.1f} MiB: "
              f"{'met' if memory['met'] else 'NOT met'})")
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
