"""What every suite shares: the record format of BENCHMARKS.md, timing, peak memory, and the
writers of the JSON, Markdown and PNG results."""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

SUITES = ("device", "attention", "mlp", "e2e_train", "decode")
# Every record this process has made, so that a run stopped from outside (run_gpu.sh's per-step
# limit sends SIGTERM) still writes the rows it has timed; see prefixkern.bench.__main__.
CREATED_RECORDS: list["Record"] = []


@dataclasses.dataclass
class Record:
    suite: str
    case: str
    impl: str
    pass_: str
    dtype: str
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mb: float | None = None
    max_err: float | None = None
    ok: bool | None = None
    note: str | None = None

    def __post_init__(self):
        CREATED_RECORDS.append(self)

    def add_note(self, text: str) -> None:
        """Append ``text`` to the note (``; `` between notes)."""
        self.note = f"{self.note}; {text}" if self.note else text

    def fail(self, exc: Exception) -> None:
        """A kernel or compiler raised: a failed row, its figures dropped and the error in its note
        (the suite goes on to its other rows)."""
        self.ok = False
        self.ms = self.tflops = self.gbps = self.tokens_per_s = self.peak_mem_mb = None
        self.add_note(f"failed: {type(exc).__name__}: {str(exc)[:300]}")

    def as_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["pass"] = out.pop("pass_")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


@dataclasses.dataclass
class Skip:
    """A baseline that could not run, with the reason printed and recorded (never dropped silently)."""
    suite: str
    case: str
    impl: str
    reason: str


@dataclasses.dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    baselines: tuple[str, ...] | None     # None = all
    shapes: tuple[str, ...] | None        # None = the suite's default
    on_gpu: bool

    def wants(self, impl: str) -> bool:
        return impl == "prefixkern" or self.baselines is None or impl in self.baselines

    def select(self, shapes: dict, cpu_shapes: dict, quick: tuple[str, ...]) -> list[tuple[str, object]]:
        """The (name, shape) cases of a suite: tiny ones on a CPU; on a GPU the --shapes asked
        for, the quick subset with --quick, else all."""
        if not self.on_gpu:
            return list(cpu_shapes.items())
        names = self.shapes or (quick if self.quick else tuple(shapes))
        return [(name, shapes[name]) for name in names if name in shapes]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Timed repetitions at the least, however long a call lasts. do_bench sizes its loops in
# milliseconds (40 ms of repetitions in quick runs), which gave a 70 ms training step a single timed
# call: the H200 run's host-bound steps then differed by up to 20 ms between rows of one case.
MIN_REPS = {True: 10, False: 20}


def bench_budget(estimate_ms: float, quick: bool) -> tuple[float, float]:
    """do_bench's ``(warmup, rep)`` in ms for a call of about ``estimate_ms``: its usual budget for
    short calls, stretched so that a long one still gets two warm-up calls and ``MIN_REPS`` timed ones."""
    warmup, rep = (10.0, 40.0) if quick else (25.0, 100.0)
    # (One call more than the minimum: do_bench's own estimate also counts its L2 flush.)
    return max(warmup, 2.0 * estimate_ms), max(rep, (MIN_REPS[quick] + 1) * estimate_ms)


# How the L2 is flushed before each timed call. do_bench zeroes a 256 MiB buffer, which leaves the
# L2 full of that buffer's dirty lines (up to 50-60 MB on an H100/H200); the timed call's own misses
# then evict them, and their write-back is DRAM traffic charged to the call. For a memory-bound call
# of about 100 MiB (a decode step's KV at 4096 x 8 on Llama-3-8B heads, W2 of its prefix MLP) that
# can be up to half as many bytes again, in every row alike, baselines included. "read" (the
# default) flushes by reading a 256 MiB buffer instead (a sum): every access goes through the L2,
# so the call's data is evicted as surely, and what the L2 holds after it is clean (the previous
# call's dirty outputs are written back during the flush, untimed). The flush streams as many bytes
# as do_bench's, so a host-bound call's row gets the same head start. "zero" is do_bench's flush.
# The device suite reads 128 MiB after each (``read-128MiB``): what the difference is on the GPU at
# hand. ``prefixkern-bench --l2-flush`` or PREFIXKERN_BENCH_FLUSH sets it for a run.
L2_FLUSH_TEXT = {"read": "256 MiB read", "zero": "256 MiB zeroed, as do_bench does"}
L2_FLUSHES = tuple(L2_FLUSH_TEXT)
L2_FLUSH = os.environ.get("PREFIXKERN_BENCH_FLUSH", "read")
FLUSH_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=None)
def _flush_buffer(device_index: int) -> torch.Tensor:
    """``FLUSH_BYTES`` of float32 on the GPU, kept for every flush."""
    return torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=torch.device("cuda", device_index))


def flush_l2(mode: str | None = None) -> None:
    """Evict the L2 before a timed call, as ``mode`` (default ``L2_FLUSH``) says: "read" sums 256 MiB,
    "zero" writes it (do_bench's flush)."""
    mode = L2_FLUSH if mode is None else mode
    if mode not in L2_FLUSHES:
        raise ValueError(f"the L2 flush (--l2-flush, PREFIXKERN_BENCH_FLUSH) must be one of {L2_FLUSHES}, "
                         f"got {mode!r}")
    buffer = _flush_buffer(torch.cuda.current_device())
    if mode == "read":
        buffer.sum()
    else:
        buffer.zero_()


def timed_calls(fn: Callable[[], object], warmup: float, rep: float, flush: Callable[[], object]) -> list[float]:
    """do_bench's loop (Triton 3.6 to 3.9) with ``flush`` for its L2 flush: one call, five flushed
    calls for an estimate, ``warmup`` ms of calls, then ``rep`` ms of calls each timed between two
    CUDA events after a flush. Returns every timed call's ms."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-6)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(max(1, int(rep / estimate)))]
    ends = [torch.cuda.Event(enable_timing=True) for _ in starts]
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    for call_start, call_end in zip(starts, ends):
        flush()
        call_start.record()
        fn()
        call_end.record()
    torch.cuda.synchronize()
    return [call_start.elapsed_time(call_end) for call_start, call_end in zip(starts, ends)]


def time_ms(fn: Callable[[], object], *, on_gpu: bool, quick: bool, samples: list[float] | None = None,
            flush: str | None = None) -> float | None:
    """Median time of ``fn`` in ms (do_bench's loop, ``timed_calls``: warm-up, the L2 flushed before
    each timed call as ``flush`` or ``L2_FLUSH`` says, at least ``MIN_REPS`` timed calls); None on
    CPU, where interpreter timings say nothing about speed. ``samples``, if given, receives every
    timed call's ms (a host-bound row's spread)."""
    if not on_gpu:
        return None
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    warmup, rep = bench_budget((time.perf_counter() - start) * 1e3, quick)
    times = timed_calls(fn, warmup, rep, lambda: flush_l2(flush))
    if samples is not None:
        samples.extend(sorted(times))
    return statistics.median(times)


# OTHER_FLUSH_IN_FULL_RUNS: the decode and MLP forward rows are timed again after the other flush
# in full runs only. The seventh H200 run (2026-11-27 19:14, the first with the read flush) timed
# them both ways in --quick: zeroing before the timed call cost a plain 128 MiB read 18% (0.0477
# against 0.0404 ms, the device suite's read-128MiB rows, which keep measuring it), the decode
# kernels 4-14% and SDPA on the concatenated cache 11-21% at 100-130 MiB of KV (P=30, cache 4096,
# B=8: SDPA 0.0515 against 0.0424 ms) and nothing at 8 MiB (P=128, cache 512, B=1). That answered
# the question; --quick keeps its minutes for rows.


def other_l2_flush() -> str:
    """The flush ``L2_FLUSH`` is not: a memory-bound row is timed after it too (``flush_note``)."""
    return "zero" if L2_FLUSH == "read" else "read"


def other_flush_note(time_fn: Callable[..., float | None], fn: Callable[[], object], nbytes: int) -> str:
    """``fn`` (a row already timed) timed again after ``other_l2_flush()`` by ``time_fn`` (the suite's
    ``time_ms``), as the row's note (``flush_note``); a failure there is noted, not the row's. Full
    runs only (OTHER_FLUSH_IN_FULL_RUNS), so timed as a full run times."""
    other = other_l2_flush()
    try:
        return flush_note(other, time_fn(fn, on_gpu=True, quick=False, flush=other), nbytes)
    except Exception as exc:      # (the row's own timing passed: its figures stand)
        return f"after a {other} flush: failed ({type(exc).__name__}: {str(exc)[:200]})"


def flush_note(flush: str, ms: float, nbytes: int) -> str:
    """A row's note: its time after ``flush`` and the GB/s of the ``nbytes`` it reads, measured beside
    the row's own time (what the flush changes for a memory-bound call)."""
    return f"after a {flush} flush ({L2_FLUSH_TEXT[flush]}): {ms:.3g} ms, {nbytes / (ms * 1e-3) / 1e9:.3g} GB/s"


def back_to_back_ms(fn: Callable[[], object], calls: int = 100) -> float:
    """Mean ms of ``fn`` over ``calls`` calls made back to back between two CUDA events, with no L2
    flush between them: what a loop of such calls (generate()'s steps) sees. ``time_ms``'s flush
    before each timed call gives the host a head start of the flush's GPU time (tens of microseconds
    on an H200), so a host-bound call's row there shows only the host time beyond it."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def spread_note(samples: list[float]) -> str:
    """How the timed calls of a row spread: their count, min, quartiles and max, in ms."""
    q1, q2, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return (f"{len(samples)} timed calls, ms: min {min(samples):.3g}, quartiles {q1:.3g} / {q2:.3g} / {q3:.3g}, "
            f"max {max(samples):.3g}")


# The rows that time an op on the launch path that is not the default here, and whether each runs
# the raw-pointer launch: prefixkern_raw_launch (PREFIXKERN_RAW_LAUNCH=1) where the plain launch is
# the default, prefixkern_plain_launch (=0) where the raw one is. Each holds its setting through the
# backward (``with_raw_launch``). Where the raw launch is the default, the e2e suite's note on the
# prefixkern row times the plain launch beside it too; the plain-launch rows keep the two paths
# timed per op (the fifth H200 run's raw rows, then opt-in, read the Llama-3-8B MLP forward at
# 0.465 ms against the plain 0.153, unexplained).
LAUNCH_PATH_ROWS = {"prefixkern_raw_launch": True, "prefixkern_plain_launch": False}


def launch_path_skip(opts: Options, impl: str) -> str | None:
    """Why the ``LAUNCH_PATH_ROWS`` row ``impl`` does not run here (None: it does): raw launches
    need a GPU, and the row would be the ``prefixkern`` row again where its launch is the default."""
    from ..kernels._launch import RAW_POINTERS

    raw = LAUNCH_PATH_ROWS[impl]
    if not opts.on_gpu:
        return "raw-pointer launches need a GPU" + ("" if raw else " (every row launches plain here)")
    if RAW_POINTERS == raw:
        path, other, setting = ("raw", "plain", 0) if raw else ("plain", "raw", 1)
        return (f"the prefixkern row launches {path} already (the default on this Triton); "
                f"PREFIXKERN_RAW_LAUNCH={setting} times the {other} launch")
    return None


def held(fn: Callable[[], object], setting: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the context manager ``setting()`` held through all of it, a backward it runs
    included (a row that times one of the kernels' switches)."""
    def held_fn():
        with setting():
            return fn()
    return held_fn


def with_raw_launch(fn: Callable[[], object], enabled: bool = True) -> Callable[[], object]:
    """``fn`` with the raw-pointer launch (PREFIXKERN_RAW_LAUNCH=1: Triton binds a launch's
    arguments once per argument key and its compiled launcher takes raw pointers) on, or off with
    ``enabled=False``, held through all of ``fn``: what the ``LAUNCH_PATH_ROWS`` and the e2e
    suite's interleaved raw/plain note time."""
    from ..kernels._launch import raw_pointer_launches

    return held(fn, lambda: raw_pointer_launches(enabled))


def release_models(on_gpu: bool) -> None:
    """After a row's model is deleted: collect what it left in reference cycles and return the
    cached blocks, so neither counts against the next row's memory."""
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()


def peak_mem_mb(fn: Callable[[], object], *, on_gpu: bool) -> float | None:
    """Peak allocated memory over one call, above what was allocated before it."""
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def max_abs_err(actual, expected) -> float:
    if isinstance(actual, (tuple, list)):
        return max(max_abs_err(a, e) for a, e in zip(actual, expected))
    return (actual.float() - expected.float()).abs().max().item()


def scaled_err(actual, expected) -> float:
    """Max abs error over the reference's max magnitude (gradients grow with the sequence)."""
    if isinstance(actual, (tuple, list)):
        return max(scaled_err(a, e) for a, e in zip(actual, expected))
    return max_abs_err(actual, expected) / max(1.0, expected.float().abs().max().item())


def versions() -> dict:
    import prefixkern

    out = {"python": platform.python_version(), "torch": torch.__version__, "prefixkern": prefixkern.__version__}
    for name in ("triton", "transformers", "peft", "flash_attn", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"


def results_stem(out_dir: Path, device: torch.device) -> str:
    """A results file name no other run in ``out_dir`` has (run_gpu.sh merges them all)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    tag = device_name(device).split(" (")[0].replace(" ", "-").replace("/", "-")
    stem = f"{now:%Y-%m-%d_%H%M%S}_{tag}"
    taken = 1
    while (out_dir / f"{stem}.json").exists():
        taken += 1
        stem = f"{now:%Y-%m-%d_%H%M%S}_{tag}_{taken}"
    return stem


def _payload(records: list[Record], skips: list[Skip], device: torch.device, command: str) -> dict:
    return {
        "device": device_name(device),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "l2_flush": L2_FLUSH,
        "records": [r.as_json() for r in records],
        "skipped": [dataclasses.asdict(s) for s in skips],
    }


def _write_atomically(path: Path, text: str) -> None:
    # A kill mid-write must leave the previous checkpoint, never half a JSON file.
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(text)
    scratch.replace(path)


def write_checkpoint(records: list[Record], out_dir: Path, device: torch.device, command: str, stem: str) -> Path:
    """Write the JSON of an unfinished run under the name its finished results will take.

    A step can stall where no signal reaches Python (a baseline's backward compiling inside
    autograd's C++ engine did, twice, on the H100); run_gpu.sh then kills it, and this file keeps
    every row timed until then for ``--merge``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    payload = _payload(records, [], device, command + "  # unfinished: the rows timed before it stopped")
    _write_atomically(path, json.dumps(payload, indent=1) + "\n")
    return path


def write_results(records: list[Record], skips: list[Skip], out_dir: Path, device: torch.device, command: str,
                  plots: bool = True, stem: str | None = None) -> dict[str, Path]:
    """Write ``<date>_<gpu>.json``, ``.md`` and PNG plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or results_stem(out_dir, device)
    payload = _payload(records, skips, device, command)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    _write_atomically(paths["json"], json.dumps(payload, indent=1) + "\n")
    paths["md"].write_text(markdown_table(payload))
    if plots and device.type == "cuda":
        paths.update(write_plots(payload, out_dir, stem))
    return paths


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def speedups(records: list[dict]) -> dict[tuple, float]:
    """baseline ms / prefixkern ms for every record, keyed like the record."""
    ours = {(r["suite"], r["case"], r["pass"], r["dtype"]): r["ms"] for r in records if r["impl"] == "prefixkern"}
    out = {}
    for r in records:
        mine = ours.get((r["suite"], r["case"], r["pass"], r["dtype"]))
        if r["ms"] and mine:
            out[(r["suite"], r["case"], r["impl"], r["pass"], r["dtype"])] = r["ms"] / mine
    return out


def markdown_table(payload: dict) -> str:
    records = payload["records"]
    ratio = speedups(records)
    lines = [f"# prefixkern benchmark: {payload['device']}", "",
             f"- date: {payload['date']}", f"- command: `{payload['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items() if v)]
    # (The six runs' files to 2026-11-27 name none: do_bench's flush, "zero". A CPU demo times nothing.)
    if payload.get("l2_flush") and any(r["ms"] for r in records):
        flushes = payload["l2_flush"].split(" ; ")    # a merged file's steps, where they differ
        lines.append("- L2 flush before each timed call: " + "; ".join(
            f"{name} ({L2_FLUSH_TEXT.get(name, 'unknown')})" for name in flushes)
            + (" (the merged steps differ: see each command)" if len(flushes) > 1 else ""))
    lines.append("")
    if not payload["device"].startswith(("NVIDIA", "AMD")) and "cpu" in payload["device"]:
        lines += ["CPU demo: correctness only. Speed figures need a GPU.", ""]
    for suite in SUITES:
        rows = [r for r in records if r["suite"] == suite]
        if not rows:
            continue
        lines += [f"## {suite}", "",
                  "| case | pass | dtype | impl | ms | speed-up of prefixkern | TFLOP/s | GB/s | tokens/s | peak MiB | max err | ok |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            key = (r["suite"], r["case"], r["impl"], r["pass"], r["dtype"])
            lines.append("| " + " | ".join([
                r["case"], r["pass"], r["dtype"], r["impl"], _fmt(r["ms"]),
                _fmt(ratio.get(key)) + ("x" if key in ratio else ""), _fmt(r["tflops"]), _fmt(r["gbps"]),
                _fmt(r["tokens_per_s"]), _fmt(r["peak_mem_mb"]), _fmt(r["max_err"], 2), _fmt(r["ok"]),
            ]) + " |")
        lines.append("")
    from .targets import markdown as targets_markdown

    lines += targets_markdown(payload)
    if payload.get("skipped"):
        lines += ["## skipped", ""] + [f"- {s['suite']} / {s['case']} / {s['impl']}: {s['reason']}"
                                       for s in payload["skipped"]] + [""]
    return "\n".join(lines)


def write_plots(payload: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    records = [r for r in payload["records"] if r["ms"]]
    for suite in SUITES:
        rows = [r for r in records if r["suite"] == suite and not r["case"].startswith("sweep-")]
        if not rows or suite == "device":     # the device probes are two numbers, in the table
            continue
        passes = sorted({r["pass"] for r in rows})
        fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4), squeeze=False)
        for ax, pass_ in zip(axes[0], passes):
            sub = [r for r in rows if r["pass"] == pass_]
            cases = list(dict.fromkeys(r["case"] for r in sub))
            impls = list(dict.fromkeys(r["impl"] for r in sub))
            width = 0.8 / max(1, len(impls))
            metric = "tflops" if suite == "attention" else "ms"
            plotted = []
            for i, impl in enumerate(impls):
                by_case = {r["case"]: r for r in sub if r["impl"] == impl}
                values = [(by_case[c][metric] or 0.0) if c in by_case else 0.0 for c in cases]
                plotted += [v for v in values if v > 0]
                ax.bar([x + i * width for x in range(len(cases))], values, width, label=impl)
            # A grid whose times span decades (decode: 0.01 ms at 512 keys, 4 ms at 32k x 64) hides its
            # small cases on a linear axis.
            log = bool(plotted) and max(plotted) > 30 * min(plotted)
            if log:
                ax.set_yscale("log")
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=30, ha="right")
            unit = "TFLOP/s (higher is better)" if suite == "attention" else "ms (lower is better)"
            ax.set_ylabel(unit + (", log scale" if log else ""))
            ax.set_title(f"{suite} {pass_} ({payload['device']})", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}_{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"png_{suite}"] = path
    paths.update(_sweep_plots(plt, records, payload["device"], out_dir, stem))
    return paths


def _sweep_plots(plt, records: list[dict], device: str, out_dir: Path, stem: str) -> dict[str, Path]:
    """Time and TFLOP/s against sequence length (sweep-S*) and prefix length (sweep-P*)."""
    paths = {}
    for axis, prefix, label in (("S", "sweep-S", "sequence length S (P = 64)"),
                                ("P", "sweep-P", "prefix length P (S = 2048)")):
        rows = [r for r in records if r["suite"] == "attention" and r["case"].startswith(prefix)]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for pass_ in sorted({r["pass"] for r in rows}):
            for impl in dict.fromkeys(r["impl"] for r in rows):
                sub = sorted((int(r["case"][len(prefix):]), r) for r in rows if r["impl"] == impl and r["pass"] == pass_)
                if not sub:
                    continue
                xs = [x for x, _ in sub]
                style = "-" if pass_ == "fwd_bwd" else "--"
                axes[0].plot(xs, [r["ms"] for _, r in sub], style, marker="o", label=f"{impl} {pass_}")
                axes[1].plot(xs, [r["tflops"] or 0.0 for _, r in sub], style, marker="o", label=f"{impl} {pass_}")
        for ax, ylabel in zip(axes, ("ms (lower is better)", "TFLOP/s (higher is better)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=6)
        axes[0].set_yscale("log")
        fig.suptitle(f"prefix attention, Llama-3-8B heads, bf16 ({device})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{stem}_attention_vs_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"png_attention_vs_{axis}"] = path
    return paths


def print_table(records: list[Record], skips: list[Skip], file=sys.stdout) -> None:
    payload = {"device": "", "date": "", "command": "", "versions": {}, "records": [r.as_json() for r in records],
               "skipped": [dataclasses.asdict(s) for s in skips]}
    text = markdown_table(payload).split("\n", 6)[-1]
    print(text, file=file)


def _records_kept_apart(payloads: list[dict]) -> list[dict]:
    """Every payload's records, in order. A case that a later file times again (the e2e-compile
    step repeats quick-e2e_train's eager rows beside its compiled ones) is renamed
    ``<case>-step<n>`` in that file, n its position among the merged files, with a note: the
    targets then read each step's rows together rather than one step's floor against another's
    patched row (the 2026-11-27 run's merge read 1.07x that way)."""
    seen, records = set(), []
    for number, payload in enumerate(payloads, 1):
        rows = [dict(r) for r in payload["records"]]
        repeated = {(r["suite"], r["case"]) for r in rows if (r["suite"], r["case"], r["pass"], r["impl"]) in seen}
        for r in rows:
            if (r["suite"], r["case"]) in repeated:
                note = f"case renamed at the merge from {r['case']}: file {number} timed it again"
                r["case"] = f"{r['case']}-step{number}"
                r["note"] = f"{r['note']}; {note}" if r.get("note") else note
        seen.update((r["suite"], r["case"], r["pass"], r["impl"]) for r in rows)
        records += rows
    return records


def merge_results(files: list[Path], out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """One results file from several of the same device (one per ``run_gpu.sh`` step)."""
    payloads = [json.loads(Path(f).read_text()) for f in files]
    devices = {p["device"] for p in payloads}
    if len(devices) != 1:
        raise ValueError(f"results from different devices cannot be merged: {sorted(devices)}")
    merged = {
        "device": devices.pop(),
        "versions": payloads[0]["versions"],
        "date": max(p["date"] for p in payloads),
        "command": " ; ".join(p["command"] for p in payloads),
        "l2_flush": " ; ".join(dict.fromkeys(p.get("l2_flush", "zero") for p in payloads)),
        "records": _records_kept_apart(payloads),
        "skipped": [s for p in payloads for s in p.get("skipped", [])],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = merged["device"].split(" (")[0].replace(" ", "-").replace("/", "-")
    stem = f"{merged['date'][:10]}_{tag}"
    existing = out_dir / f"{stem}.json"
    if existing.exists() and existing.resolve() not in {Path(f).resolve() for f in files}:
        previous = json.loads(existing.read_text())
        if (previous.get("date"), previous.get("command")) != (merged["date"], merged["command"]):
            # Another run of the same day: its own files, the first run's kept (the project's history).
            stem = f"{merged['date'][:16].replace('T', '_').replace(':', '')}_{tag}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(merged, indent=1) + "\n")
    paths["md"].write_text(markdown_table(merged))
    if plots and "cpu" not in merged["device"]:
        paths.update(write_plots(merged, out_dir, stem))
    return paths
