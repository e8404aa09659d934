"""The benchmark CLI's CPU mode: it runs every suite's pipeline through the interpreter, checks
each result, writes the JSON of BENCHMARKS.md and a Markdown table, and reports no speed."""
import dataclasses
import json
import warnings

import pytest
import torch

import prefixkern

from prefixkern.bench.__main__ import main
from prefixkern.bench.common import Record, markdown_table, speedups

from conftest import record_launches

RECORD_KEYS = {"suite", "case", "impl", "pass", "dtype", "ms", "tflops", "gbps", "tokens_per_s", "peak_mem_mb",
               "max_err", "ok"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU demo runs only without a GPU")
def test_cpu_demo_writes_checked_records(tmp_path, capsys):
    assert main(["--quick", "--out-dir", str(tmp_path), "--suite", "attention", "mlp", "decode", "e2e_train"]) == 0
    printed = capsys.readouterr().out
    assert "Speed figures need a GPU" in printed
    (json_path,) = tmp_path.glob("*.json")
    payload = json.loads(json_path.read_text())
    assert {"device", "versions", "date", "command", "records"} <= payload.keys()
    assert payload["command"].startswith("prefixkern-bench --quick")
    records = payload["records"]
    assert {r["suite"] for r in records} == {"attention", "mlp", "decode", "e2e_train"}
    for record in records:
        assert RECORD_KEYS <= record.keys()
        assert record["ms"] is None and record["tflops"] is None      # no speed from a CPU
    ours = [r for r in records if r["impl"] == "prefixkern"]
    assert ours and all(r["ok"] is True for r in ours)
    # A decoding step with its cache append, ours and HF's DynamicCache + SDPA, both checked.
    steps = {r["impl"]: r for r in records if r["suite"] == "decode" and r["pass"] == "step"}
    assert set(steps) == {"prefixkern", "hf_dynamic_cache_sdpa"} and all(r["ok"] for r in steps.values())
    # Stock PEFT's generate() is a baseline; where transformers drops its prefix the row says so.
    stock_generate = [r for r in records if r["pass"] == "generate" and r["impl"] == "peft_sdpa"]
    assert all(r["ok"] is not False or "without its prefix" in (r["note"] or "") for r in stock_generate)
    # Baselines that cannot run here are listed with a reason, not dropped.
    assert any(s["impl"] == "flex" and s["reason"] for s in payload["skipped"])
    assert {s["impl"] for s in payload["skipped"] if "torch.compile rows run on a GPU" in s["reason"]} == {
        "floor_compiled", "peft_sdpa_compiled", "prefixkern_compiled"}
    assert (json_path.with_suffix(".md")).read_text().startswith("# prefixkern benchmark")


def test_a_run_stopped_by_sigterm_writes_the_rows_it_timed(tmp_path, monkeypatch):
    """run_gpu.sh stops a step at its limit with SIGTERM: the rows timed until then, the current
    suite's included, are written; a second run in the same minute gets its own files."""
    import os
    import signal

    from prefixkern.bench import device

    def suite_stopped_midway(opts, progress):
        Record("device", "timed", "torch", "fwd", "bfloat16", ms=1.5)
        Record("device", "untimed", "torch", "fwd", "bfloat16")        # begun, never timed
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM should have stopped the suite")

    monkeypatch.setattr(device, "run", suite_stopped_midway)
    Record("device", "an earlier run's", "torch", "fwd", "bfloat16", ms=2.0)     # not this run's
    assert main(["--suite", "device", "--out-dir", str(tmp_path), "--no-plots"]) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    (json_path,) = tmp_path.glob("*.json")
    payload = json.loads(json_path.read_text())
    assert [r["case"] for r in payload["records"]] == ["timed"]
    assert "stopped by SIGTERM" in payload["command"]

    monkeypatch.setattr(device, "run", lambda opts, progress: ([Record("device", "x", "torch", "fwd", "bf16")], []))
    for _ in range(2):
        assert main(["--suite", "device", "--out-dir", str(tmp_path), "--no-plots"]) == 0
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_rows_are_on_disk_before_the_run_ends(tmp_path, monkeypatch):
    """A step can stall where SIGTERM never reaches Python (a baseline's backward compiling inside
    autograd's C++ engine) and be killed: each row is on disk once the next one begins, under the
    name the finished run then takes."""
    from prefixkern.bench import device

    seen = {}

    def suite(opts, progress):
        progress("first row")
        first = Record("device", "first", "torch", "fwd", "bfloat16", ms=1.5)
        progress("second row")
        (json_path,) = tmp_path.glob("*.json")
        seen["path"], seen["midway"] = json_path, json.loads(json_path.read_text())
        Record("device", "second", "torch", "fwd", "bfloat16")          # begun, never timed
        return [first], []

    monkeypatch.setattr(device, "run", suite)
    assert main(["--suite", "device", "--out-dir", str(tmp_path), "--no-plots"]) == 0
    assert [r["case"] for r in seen["midway"]["records"]] == ["first"]
    assert "unfinished" in seen["midway"]["command"]
    (json_path,) = tmp_path.glob("*.json")
    assert json_path == seen["path"] and not list(tmp_path.glob("*.tmp"))
    final = json.loads(json_path.read_text())
    assert [r["case"] for r in final["records"]] == ["first"] and "unfinished" not in final["command"]


STALLING_RUN = """
import ctypes, sys
from prefixkern.bench import device
from prefixkern.bench.__main__ import main
from prefixkern.bench.common import Record

def suite_that_stalls_in_cpp(opts, progress):
    progress("first row")
    Record("device", "timed", "torch", "fwd", "bfloat16", ms=1.5)
    progress("second row")
    print("stalling", flush=True)
    # A wait in C that no signal interrupts: a normal mutex locked twice by one thread (glibc's
    # initializer is all zeros). Python's SIGTERM handler never runs, as in autograd's C++ engine.
    libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)

device.run = suite_that_stalls_in_cpp
main(["--suite", "device", "--out-dir", sys.argv[1], "--no-plots"])
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="POSIX signals")
def test_a_step_stalled_in_cpp_keeps_its_rows_and_says_where_it_stalled(tmp_path):
    """What happened on the H100: a step stalled where SIGTERM never reaches Python, and
    run_gpu.sh's timeout then kills it. The rows timed before are on disk, and the SIGTERM
    dumps every thread's stack (faulthandler), naming the stalled call."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pathlib import Path

    checkout = str(Path(__file__).resolve().parent.parent)      # this checkout's prefixkern, installed or not
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", STALLING_RUN, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:           # (the CPU demo's banner comes first)
            if line.strip() == "stalling":
                break
        time.sleep(1)                      # into the wait
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert proc.poll() is None, "the stall was expected to outlive SIGTERM, as on the GPU"
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "suite_that_stalls_in_cpp" in stderr, stderr[-2000:]
    (json_path,) = tmp_path.glob("*.json")
    payload = json.loads(json_path.read_text())
    assert [r["case"] for r in payload["records"]] == ["timed"] and "unfinished" in payload["command"]


def test_the_stop_signal_is_not_caught_as_a_baseline_failure(tmp_path, monkeypatch):
    """Baselines wrap compilers that catch ``Exception``; the SIGTERM stop must pass through them."""
    import os
    import signal

    from prefixkern.bench import device

    def suite_with_a_catch_all(opts, progress):
        Record("device", "timed", "torch", "fwd", "bfloat16", ms=1.5)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:
            raise AssertionError("the stop was caught as an ordinary error")
        raise AssertionError("the SIGTERM should have stopped the suite")

    monkeypatch.setattr(device, "run", suite_with_a_catch_all)
    assert main(["--suite", "device", "--out-dir", str(tmp_path), "--no-plots"]) == 0
    (json_path,) = tmp_path.glob("*.json")
    payload = json.loads(json_path.read_text())
    assert [r["case"] for r in payload["records"]] == ["timed"] and "stopped by SIGTERM" in payload["command"]


def test_mlp_rows_hold_their_float32_products_through_the_backward(tmp_path, monkeypatch):
    """The default row takes 3xTF32 products and the prefixkern_fma row FMA ones, in the forward
    and in the backward (which runs after the row's function returns: a setting made only around
    the forward timed the FMA backward under the 3xTF32 row's name once)."""
    from prefixkern.bench import mlp as mlp_suite
    from prefixkern.kernels import prefix_mlp as kernels

    launched = []
    real_launch = kernels.launch_kernel

    def recording_launch(kernel, grid, *args, **meta):
        if meta.get("PRECISION") is not None:
            launched.append((kernel.fn.__name__, meta["PRECISION"]))
        return real_launch(kernel, grid, *args, **meta)

    def progress_and_mark(message):
        launched.append(("row", message))

    monkeypatch.setattr(kernels, "launch_kernel", recording_launch)
    monkeypatch.setattr(mlp_suite, "_fma_skip", lambda opts, shape: None)     # the GPU's rows, here
    monkeypatch.setattr(mlp_suite, "time_ms", lambda fn, **kw: (fn(), 1.0)[1])  # a GPU's timing calls, once
    from prefixkern.bench.common import Options

    opts = Options(torch.device("cpu"), torch.bfloat16, True, ("prefixkern", "prefixkern_fma"), None, False)
    with prefixkern.use_backend("triton"):
        records, _ = mlp_suite.run(opts, progress_and_mark)
    assert {(r.case, r.impl, r.pass_) for r in records} >= {("cpu-tiny", i, p) for i in ("prefixkern", "prefixkern_fma")
                                                            for p in ("fwd", "fwd_bwd")}
    assert all(r.ok for r in records)
    # --quick times each row after the run's own flush only (a full run times the forward rows after
    # do_bench's flush too: OTHER_FLUSH_IN_FULL_RUNS).
    assert not any("after a zero flush" in (r.note or "") for r in records)
    rows, row = {}, None
    for name, value in launched:
        if name == "row":
            row = tuple(value.split()[1:])      # case, pass, impl
            rows[row] = []
        else:
            rows[row].append((name, value))
    assert {v for _, v in rows[("cpu-tiny", "fwd_bwd", "prefixkern")]} == {"tf32x3"}
    assert {v for _, v in rows[("cpu-tiny", "fwd_bwd", "prefixkern_fma")]} == {"ieee"}
    assert "prefix_mlp_bwd_kernel" in {k for k, _ in rows[("cpu-tiny", "fwd_bwd", "prefixkern_fma")]}
    # A row's tile note names what its own call launched, not what the previous row's timing left.
    notes = {(r.case, r.impl, r.pass_): r.note for r in records if r.impl.startswith("prefixkern")}
    assert len({case for case, _, _ in notes}) == 2, notes      # a case's rows follow another's
    assert all((" bwd:" in note) == (pass_ == "fwd_bwd") for (_, _, pass_), note in notes.items()), notes


@pytest.mark.parametrize("raw_default", [False, True], ids=["plain-default", "raw-default"])
def test_raw_launch_rows_hold_their_setting_through_the_backward(monkeypatch, raw_default):
    """The attention and MLP suites' rows of the launch path that is not the default (on a GPU:
    prefixkern_raw_launch, the op with PREFIXKERN_RAW_LAUNCH=1, where the plain launch is the
    default; prefixkern_plain_launch, with it 0, where the raw one is) launch every kernel, the
    backward's included, under their setting, and the prefixkern rows under the default. Here
    the rows are let run on the CPU, where a raw launch falls back to a plain one; the setting is
    read at each launch. Without a GPU the suites skip the rows with their reason."""
    from prefixkern.bench import attention as attention_suite
    from prefixkern.bench import mlp as mlp_suite
    from prefixkern.bench.common import Options
    from prefixkern.kernels import _launch
    from prefixkern.kernels import prefix_attention_bwd, prefix_attention_fwd
    from prefixkern.kernels import prefix_mlp as mlp_kernels

    other = "prefixkern_plain_launch" if raw_default else "prefixkern_raw_launch"
    monkeypatch.setattr(_launch, "RAW_POINTERS", raw_default)
    opts = Options(torch.device("cpu"), torch.bfloat16, True, ("prefixkern", other), None, False)
    with prefixkern.use_backend("triton"):
        _, attention_skips = attention_suite.run(opts, lambda message: None)
        _, mlp_skips = mlp_suite.run(opts, lambda message: None)
    for skips in (attention_skips, mlp_skips):
        assert any(s.impl == other and "need a GPU" in s.reason for s in skips), skips

    row = [None]
    launched = record_launches(monkeypatch, (prefix_attention_fwd, prefix_attention_bwd, mlp_kernels),
                               lambda kernel, meta: (row[0], kernel.fn.__name__, _launch.RAW_POINTERS))
    monkeypatch.setattr(attention_suite, "unavailable", lambda impl, opts, case=None: None)
    for part in (attention_suite.attention_packed, attention_suite.attention_dropout):
        monkeypatch.setattr(part, "run", lambda opts, progress: ([], []))
    monkeypatch.setattr(mlp_suite, "launch_path_skip",
                        lambda opts, impl: None if mlp_suite.LAUNCH_PATH_ROWS[impl] != raw_default else "default")
    with prefixkern.use_backend("triton"):
        records, _ = attention_suite.run(opts, lambda message: row.__setitem__(0, message))
        mlp_records, _ = mlp_suite.run(opts, lambda message: row.__setitem__(0, message))
    records += mlp_records
    assert all(r.ok for r in records), [r for r in records if not r.ok]
    assert {(r.suite, r.impl) for r in records} == {(suite, impl) for suite in ("attention", "mlp")
                                                    for impl in ("prefixkern", other)}
    # The MLP suite times the other path right after the prefixkern row.
    assert [r.impl for r in mlp_records][:2] == ["prefixkern", other]
    for message, kernel, raw in launched:
        assert raw == (message.endswith(other) != raw_default), (message, kernel, raw)
    assert any(kernel.startswith("prefix_attention_bwd") and raw != raw_default and message.endswith(other)
               for message, kernel, raw in launched)
    assert any(kernel == "prefix_mlp_bwd_kernel" and raw != raw_default and message.endswith(other)
               for message, kernel, raw in launched)


def _switched_off_row_launches(monkeypatch, impl: str, shape: str, other_shape: str, only: str, modules):
    """The attention suite's ``prefixkern`` and ``impl`` rows (a SWITCHED_OFF_ROWS entry), run here on
    the CPU after checking that the suite skips ``impl`` without a GPU, and on a GPU at shapes other
    than ``shape`` (``other_shape``'s message names ``only``), and that every row passed. Returns every
    launch of ``modules``' kernels as ``(row message, kernel name, constexprs)``."""
    from prefixkern.bench import attention as attention_suite
    from prefixkern.bench.common import Options

    impls = ("prefixkern", impl)
    opts = Options(torch.device("cpu"), torch.bfloat16, True, impls, None, False)
    assert "on a GPU" in attention_suite.unavailable(impl, opts, shape)
    on_gpu = Options(torch.device("cpu"), torch.bfloat16, True, None, None, True)
    assert attention_suite.unavailable(impl, on_gpu, shape) is None
    assert only in attention_suite.unavailable(impl, on_gpu, other_shape)

    row = [None]
    launched = record_launches(monkeypatch, modules, lambda kernel, meta: (row[0], kernel.fn.__name__, meta))
    monkeypatch.setattr(attention_suite, "unavailable", lambda impl, opts, case=None: None)
    for part in (attention_suite.attention_packed, attention_suite.attention_dropout):
        monkeypatch.setattr(part, "run", lambda opts, progress: ([], []))
    with prefixkern.use_backend("triton"):
        records, _ = attention_suite.run(opts, lambda message: row.__setitem__(0, message))
    assert all(r.ok for r in records) and {r.impl for r in records} == set(impls)
    return launched


def test_in_order_rows_launch_every_kernel_in_launch_order(monkeypatch):
    """The attention suite's prefixkern_in_order rows (on a GPU, at llama8b-2k/8k: the op with its
    causal programs in launch order, beside prefixkern's heaviest first) launch the forward and
    both backward kernels with HEAVY_FIRST off, and the prefixkern rows with it on. Here the rows
    are let run on the CPU; without a GPU, and at other shapes, the suite skips them with why."""
    from prefixkern.kernels import prefix_attention_bwd, prefix_attention_fwd

    launched = _switched_off_row_launches(monkeypatch, "prefixkern_in_order", "llama8b-8k", "seed-qwen",
                                          "llama8b-2k and llama8b-8k only", (prefix_attention_fwd, prefix_attention_bwd))
    for message, kernel, meta in launched:
        assert meta["HEAVY_FIRST"] == (not message.endswith("prefixkern_in_order")), (message, kernel, meta)
    # (The CPU shapes' short rows take the backward in one launch: the dK/dV kernel with the dQ programs.)
    assert {kernel for message, kernel, _ in launched if message.endswith("in_order")} == {
        "prefix_attention_fwd_kernel", "prefix_attention_bwd_dkdv_kernel"}


def test_group_per_program_rows_launch_dkdv_without_head_splits(monkeypatch):
    """The attention suite's prefixkern_group_per_program rows (on a GPU, at qwen-2k: each GQA
    group's heads in one dK/dV program, beside prefixkern's head splits) launch dK/dV with
    HEAD_SPLITS 1, the prefixkern rows with the rule's splits (here made to split the CPU shapes'
    short rows). Without a GPU, and at other shapes, the suite skips them with why."""
    from prefixkern.kernels import prefix_attention_bwd

    monkeypatch.setattr(prefix_attention_bwd, "DKDV_SPLIT_MIN_QUERIES", 0)
    launched = _switched_off_row_launches(monkeypatch, "prefixkern_group_per_program", "qwen-2k", "llama8b-2k",
                                          "qwen-2k only", (prefix_attention_bwd,))
    gqa = [(message, meta["HEAD_SPLITS"]) for message, _, meta in launched
           if "HEAD_SPLITS" in meta and "-gqa " in message]     # (MHA: no group to share)
    assert gqa and all((splits == 1) == message.endswith("group_per_program") for message, splits in gqa), launched


def test_two_launch_bwd_rows_launch_dq_then_dkdv(monkeypatch):
    """The attention suite's prefixkern_two_launch_bwd rows (on a GPU, at seed-qwen: the backward as
    dQ then dK/dV, beside prefixkern's one launch) launch both backward kernels, the prefixkern rows
    the dK/dV kernel alone with the dQ programs (WITH_DQ). Without a GPU, and at other shapes, the
    suite skips them with why."""
    from prefixkern.kernels import prefix_attention_bwd

    launched = _switched_off_row_launches(monkeypatch, "prefixkern_two_launch_bwd", "seed-qwen", "llama8b-2k",
                                          "seed-qwen only", (prefix_attention_bwd,))
    for impl, expected in (("prefixkern", {("prefix_attention_bwd_dkdv_kernel", True)}),
                           ("prefixkern_two_launch_bwd", {("prefix_attention_bwd_dq_kernel", None),
                                                          ("prefix_attention_bwd_dkdv_kernel", False)})):
        got = {(kernel, meta.get("WITH_DQ")) for message, kernel, meta in launched if message.endswith(f" {impl}")}
        assert got == expected, (impl, launched)


def test_compiled_e2e_rows_run_on_a_gpu_and_only_when_asked_in_quick_runs():
    """The torch.compile rows of the training-step suite (minutes of compiling each): on a GPU, in
    full runs, or in --quick runs that name them; each compiles the eager row of the same name."""
    from prefixkern.bench import e2e
    from prefixkern.bench.common import Options

    def opts(on_gpu, quick, baselines=None):
        return Options(torch.device("cpu"), torch.bfloat16, quick, baselines, None, on_gpu)

    assert "GPU" in e2e._compiled_row_skipped(opts(False, False))
    assert "--baselines" in e2e._compiled_row_skipped(opts(True, True))
    assert e2e._compiled_row_skipped(opts(True, True, ("prefixkern", "prefixkern_compiled"))) is None
    assert e2e._compiled_row_skipped(opts(True, False)) is None
    assert [e2e._eager_impl(i) for i in e2e.COMPILED_IMPLS] == ["floor_no_prefix", "prefixkern", "peft_sdpa"]


def test_speedups_and_table_from_records():
    records = [Record("attention", "x", "prefixkern", "fwd", "bfloat16", ms=1.0, ok=True).as_json(),
               Record("attention", "x", "sdpa_mask", "fwd", "bfloat16", ms=2.5, ok=True).as_json()]
    assert speedups(records)[("attention", "x", "sdpa_mask", "fwd", "bfloat16")] == 2.5
    table = markdown_table({"device": "NVIDIA H100", "date": "d", "command": "c", "versions": {}, "records": records})
    assert "| x | fwd | bfloat16 | sdpa_mask | 2.5 | 2.5x |" in table


def test_bad_option_is_refused():
    with pytest.raises(SystemExit):
        main(["--suite", "nope"])


def test_plots_are_drawn_from_records(tmp_path):
    """The PNG writers run on records of every kind (synthetic values: this checks drawing only)."""
    from prefixkern.bench.common import write_plots

    records = [dict(suite="attention", case=case, impl=impl, ms=1.0 + i, tflops=10.0 + i, **{"pass": pass_})
               for i, (case, impl, pass_) in enumerate(
                   (c, m, p) for c in ("seed-qwen", "sweep-S512", "sweep-S1024", "sweep-P16", "sweep-P64")
                   for m in ("prefixkern", "sdpa_mask") for p in ("fwd", "fwd_bwd"))]
    paths = write_plots({"records": records, "device": "synthetic"}, tmp_path, "plot")
    assert set(paths) == {"png_attention", "png_attention_vs_S", "png_attention_vs_P"}
    assert all(path.stat().st_size > 1000 for path in paths.values())


def test_plots_of_times_spanning_decades_take_a_log_axis(tmp_path, monkeypatch):
    """A decode grid's times run from 0.01 ms to 4 ms: a log axis, so the small cases show; a pass
    whose times stay within 30x keeps a linear one."""
    import matplotlib.axes

    from prefixkern.bench.common import write_plots

    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda self, value, **kw: scales.append(value))
    records = [dict(suite="decode", case=f"c{i}", impl="prefixkern", ms=ms, tflops=None, **{"pass": pass_})
               for pass_, times in (("fwd", (0.012, 4.2)), ("step", (1.0, 2.0))) for i, ms in enumerate(times)]
    write_plots({"records": records, "device": "synthetic"}, tmp_path, "plot")
    assert scales == ["log"]


def test_merge_results_of_one_device(tmp_path):
    from prefixkern.bench.common import merge_results

    def payload(suite, date):
        return {"device": "NVIDIA H100 80GB HBM3", "versions": {"torch": "x"}, "date": date,
                "command": f"prefixkern-bench --suite {suite}",
                "records": [Record(suite, "c", "prefixkern", "fwd", "bfloat16", ok=True).as_json()], "skipped": []}

    files = []
    for i, suite in enumerate(("attention", "mlp")):
        files.append(tmp_path / f"{suite}.json")
        files[-1].write_text(json.dumps(payload(suite, f"2026-11-2{i}T00:00:00+00:00")))
    paths = merge_results(files, tmp_path / "merged", plots=False)
    merged = json.loads(paths["json"].read_text())
    assert [r["suite"] for r in merged["records"]] == ["attention", "mlp"]
    assert paths["json"].name == "2026-11-21_NVIDIA-H100-80GB-HBM3.json"
    # Merged again (the same inputs): the same file. A later run of the same day: its own file.
    assert merge_results(files, tmp_path / "merged", plots=False)["json"] == paths["json"]
    later = tmp_path / "later.json"
    later.write_text(json.dumps(payload("decode", "2026-11-21T06:56:01+00:00")))
    assert merge_results([later], tmp_path / "merged", plots=False)["json"].name == \
        "2026-11-21_0656_NVIDIA-H100-80GB-HBM3.json"
    assert json.loads(paths["json"].read_text()) == merged
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**payload("decode", "2026-11-22T00:00:00+00:00"), "device": "NVIDIA H200"}))
    with pytest.raises(ValueError, match="different devices"):
        merge_results(files + [other], tmp_path / "bad")


def test_merge_keeps_a_case_timed_again_by_a_later_step_apart(tmp_path):
    """The e2e-compile step times quick-e2e_train's case again (its eager rows beside the compiled
    ones): merged, the later step's rows of that case are renamed <case>-step<n>, notes kept, so the
    targets compare each step's floor with its own patched row; cases timed once keep their names."""
    from prefixkern.bench.common import merge_results
    from prefixkern.bench.targets import markdown as targets_markdown

    def step(date, rows):
        return {"device": "NVIDIA H200", "versions": {"torch": "x"}, "date": date, "command": "prefixkern-bench",
                "records": [dict(Record("e2e_train", case, impl, "step", "bfloat16", ms=ms, ok=True).as_json(),
                                 note=note) for case, impl, ms, note in rows], "skipped": []}

    case = "qwen2.5-0.5b-S256"
    files = [tmp_path / "quick.json", tmp_path / "compile.json"]
    files[0].write_text(json.dumps(step("2026-11-27T12:24:55+00:00", [
        (case, "floor_no_prefix", 76.3, None), (case, "prefixkern", 90.3, None), ("other", "prefixkern", 9.0, None)])))
    files[1].write_text(json.dumps(step("2026-11-27T12:26:39+00:00", [
        (case, "floor_no_prefix", 84.3, "9 timed calls"), (case, "prefixkern", 97.0, None),
        (case, "floor_compiled", 12.3, None)])))
    merged = json.loads(merge_results(files, tmp_path / "merged", plots=False)["json"].read_text())
    cases = [(r["case"], r["impl"]) for r in merged["records"]]
    assert cases == [(case, "floor_no_prefix"), (case, "prefixkern"), ("other", "prefixkern"),
                     (f"{case}-step2", "floor_no_prefix"), (f"{case}-step2", "prefixkern"),
                     (f"{case}-step2", "floor_compiled")]
    notes = [r["note"] for r in merged["records"][3:]]
    assert notes[0] == f"9 timed calls; case renamed at the merge from {case}: file 2 timed it again"
    assert all("renamed" in note for note in notes) and merged["records"][0]["note"] is None
    table = "\n".join(targets_markdown(merged))
    assert "1.18x floor" in table and "1.15x floor" in table       # 90.3 / 76.3 and 97.0 / 84.3


def test_liger_row_does_not_leak_into_the_baselines():
    """Liger-Kernel's apply functions also replace classes in the transformers modeling module; the
    e2e suite builds its baselines in the same process, so it restores the module after patching
    the one instance (a stand-in for Liger's apply, which needs a GPU to run)."""
    import transformers as tf
    from transformers.models.llama import modeling_llama

    from prefixkern.bench import e2e

    original_norm, original_mlp = modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP

    class StandInNorm(torch.nn.Module):
        pass

    def apply_like_liger(model=None, rope=True):
        modeling_llama.LlamaRMSNorm = StandInNorm          # what Liger does to the module
        modeling_llama.LlamaMLP = StandInNorm
        modeling_llama.liger_only_helper = object()
        model.model.norm = StandInNorm()                   # and to the instance

    config = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    model = tf.LlamaForCausalLM(config)
    e2e._apply_to_instance_only(apply_like_liger, model)
    assert isinstance(model.model.norm, StandInNorm)
    assert modeling_llama.LlamaRMSNorm is original_norm and modeling_llama.LlamaMLP is original_mlp
    assert not hasattr(modeling_llama, "liger_only_helper")
    assert isinstance(tf.LlamaForCausalLM(config).model.norm, original_norm)


def test_packed_baselines_lay_out_what_they_claim(monkeypatch):
    """The packed-attention baselines that need a GPU package build their inputs right: the
    flash-attn one (run here through a stand-in with flash_attn_varlen_func's documented semantics:
    per-sequence keys from cu_seqlens_k, causal bottom-right aligned, GQA by head groups) and the
    padded ones give the oracle's output."""
    import sys
    import types

    from prefixkern import reference
    from prefixkern.bench import attention_packed as packed

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert cu_q.dtype == cu_k.dtype == torch.int32
        outs = []
        for b in range(cu_q.numel() - 1):
            qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
            kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
            vb = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0)
            assert qb.shape[1] <= max_q and kb.shape[1] <= max_k
            scores = qb @ kb.transpose(-1, -2) / qb.shape[-1] ** 0.5
            i = torch.arange(qb.shape[1])[:, None]
            j = torch.arange(kb.shape[1])[None, :]
            scores = scores.masked_fill(j > i + kb.shape[1] - qb.shape[1], float("-inf"))
            outs.append((scores.softmax(-1) @ vb).transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    shape = packed.PackedShape("t", 6, 2, 16, (4, 11, 1, 7), 3)
    (q, k, v, pk, pv), _, cu = packed.make_inputs(shape, torch.device("cpu"), torch.float32, False)
    expected = reference.prefix_attention_varlen(q, k, v, pk, pv, cu, cu, causal=True)
    for impl in ("flash_attn", "prefixkern_padded", "sdpa_mask", "prefixkern"):
        torch.testing.assert_close(packed.IMPLS[impl](q, k, v, pk, pv, cu), expected, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, impl=impl: f"{impl}: {m}")


def test_dropout_cases_check_prefixkern_under_its_own_mask(monkeypatch):
    """The attention suite's dropout cases (GPT-2's training attention) run every row here: prefixkern
    checked against the oracle under the keep mask its seed draws, prefixkern_no_dropout and the
    baselines with dropout off (their masks come from other generators), each saying so in its note;
    flash-attn is skipped with its reason. The check is real: told another seed, the oracle's mask
    differs and the prefixkern rows fail while the others still pass."""
    from prefixkern.bench import attention_dropout as dropout_suite
    from prefixkern.bench.common import Options

    opts = Options(torch.device("cpu"), torch.bfloat16, True, None, None, False)
    with prefixkern.use_backend("triton"):
        records, skips = dropout_suite.run(opts, lambda message: None)
    assert {r.impl for r in records} == {"prefixkern", "prefixkern_no_dropout", "eager", "sdpa_mask",
                                         "sdpa_lower_right"}
    assert {r.pass_ for r in records} == {"fwd", "fwd_bwd"} and all(r.ok for r in records), records
    assert [s.impl for s in skips] == ["flash_attn"]
    for r in records:
        assert ("under its own mask" in r.note) == (r.impl == "prefixkern"), r
        assert ("checked at p=0" in r.note) == (r.impl != "prefixkern"), r

    real_seed = dropout_suite._drawn_seed
    monkeypatch.setattr(dropout_suite, "_drawn_seed", lambda device: real_seed(device) + 1)
    opts = Options(torch.device("cpu"), torch.bfloat16, True, ("prefixkern", "prefixkern_no_dropout"), None, False)
    with prefixkern.use_backend("triton"):
        records, _ = dropout_suite.run(opts, lambda message: None)
    assert {(r.impl, r.ok) for r in records} == {("prefixkern", False), ("prefixkern_no_dropout", True)}, records


def _rec(suite, case, impl, pass_, **values):
    return Record(suite, case, impl, pass_, "bfloat16", **values).as_json()


def test_targets_judge_each_issue_from_the_records():
    """Each issue's target is met, missed or marked without data, from the records alone; the
    relative ones read the run's own device probes."""
    from prefixkern.bench.targets import evaluate

    records = [
        _rec("device", "matmul-8192", "torch", "fwd", ms=1.0, tflops=800.0),
        _rec("device", "copy-512MiB", "torch", "fwd", ms=1.0, gbps=4000.0),
        _rec("attention", "llama8b-2k", "prefixkern", "fwd_bwd", ms=2.0, peak_mem_mb=90.0),
        _rec("attention", "llama8b-2k", "flex", "fwd_bwd", ms=2.2, peak_mem_mb=100.0),
        _rec("attention", "llama8b-2k", "sdpa_mask", "fwd_bwd", ms=3.0, peak_mem_mb=300.0),
        _rec("attention", "llama8b-8k", "prefixkern", "fwd", ms=1.0, tflops=480.0),
        _rec("mlp", "llama3-8b", "prefixkern", "fwd", ms=0.1, gbps=3000.0),
        _rec("mlp", "llama3-8b", "torch_p_rows", "fwd", ms=0.15),
        _rec("e2e_train", "qwen2.5-0.5b-S2048", "floor_no_prefix", "step", ms=100.0, peak_mem_mb=1000.0),
        _rec("e2e_train", "qwen2.5-0.5b-S2048", "peft_sdpa", "step", ms=130.0),
        _rec("e2e_train", "qwen2.5-0.5b-S2048", "prefixkern", "step", ms=104.0, peak_mem_mb=1030.0, max_err=0.0,
             ok=True),
        # Both compiled: judged as a pair of their own, beside the eager pair.
        _rec("e2e_train", "qwen2.5-0.5b-S2048", "floor_compiled", "step", ms=20.0),
        _rec("e2e_train", "qwen2.5-0.5b-S2048", "prefixkern_compiled", "step", ms=21.2),
        _rec("decode", "P30-L4096-B8", "prefixkern", "fwd", ms=0.04, gbps=3000.0),
        # (Every decode row's GB/s counts the same bytes, ours: 120 MB here, in 0.05 ms.)
        _rec("decode", "P30-L4096-B8", "sdpa_concat", "fwd", ms=0.05, gbps=2400.0),
        _rec("decode", "P30-L4096-B8", "prefixkern_triton", "fwd", ms=0.1),
        _rec("decode", "P30-L4096-B8", "prefixkern_triton_decode", "fwd", ms=0.03),
        _rec("decode", "P30-L4096-B8", "prefixkern_tensor_cores", "fwd", ms=0.02, gbps=3500.0),
        _rec("decode", "P30-L4096-B8", "prefixkern_cuda_cores", "fwd", ms=0.1, gbps=700.0),
        # Step rows (cache append + attention): a target of their own; no verdict of the fwd targets changes.
        _rec("decode", "P30-L4096-B8", "prefixkern", "step", ms=0.001),
        _rec("decode", "P30-L4096-B8", "hf_dynamic_cache_sdpa", "step", ms=0.5),
        _rec("decode", "qwen2.5-0.5b-B8", "peft_sdpa", "generate", ms=1180.0),
        _rec("decode", "qwen2.5-0.5b-B8", "prefixkern", "generate", ms=1330.0),
        _rec("decode", "qwen2.5-0.5b-B8", "prefixkern_tensor_cores", "generate", ms=1100.0),
        # A static request stock PEFT failed (no peft_sdpa row): judged against stock's dynamic row.
        _rec("decode", "qwen2.5-0.5b-B8-static", "prefixkern", "generate", ms=200.0),
        _rec("decode", "llama3.2-1b-B8-static", "prefixkern", "generate", ms=200.0),
    ]
    got = {(t.issue, t.what, t.case): t.met for t in evaluate({"records": records})}
    assert got[(2, "fwd+bwd at least as fast as the fastest baseline", "llama8b-2k")] is True
    assert got[(2, "fwd+bwd 2x faster than HF sdpa with a PEFT prefix (sdpa_mask)", "llama8b-2k")] is False   # 1.5x
    assert got[(2, "fwd+bwd peak memory below every baseline's", "llama8b-2k")] is True
    assert got[(2, "fwd+bwd at least as fast as the fastest baseline", "long-32k")] is None                  # not run
    assert got[(2, "fwd at 55% or more of the GPU's measured bf16 matmul TFLOP/s", "llama8b-8k")] is True   # 60%
    assert got[(3, "fwd 1.2x faster than the same math in PyTorch on P rows", "llama3-8b")] is True         # 1.5x
    assert got[(3, "reads W2 at 70% or more of the GPU's measured bandwidth (fwd)", "llama3-8b")] is True   # 75%
    assert got[(4, "step within 5% of the floor's time", "qwen2.5-0.5b-S2048")] is True
    assert got[(4, "step within 5% of the floor's time (both compiled)", "qwen2.5-0.5b-S2048")] is False      # 1.06x
    assert got[(4, "peak memory within 2% of the floor's", "qwen2.5-0.5b-S2048")] is False                  # 3%
    assert got[(4, "1.2x stock PEFT + sdpa tokens/s at S=2048", "qwen2.5-0.5b-S2048")] is True
    assert got[(6, "2x faster than SDPA on the concatenated cache", "P30-L4096-B8")] is False              # 1.25x
    # Beside it, the most any kernel could gain there: SDPA's time over our bytes read at the probe's
    # 4000 GB/s (0.05 ms against 0.03): 1.67x, under the 2x asked.
    values = {(t.issue, t.what, t.case): t.value for t in evaluate({"records": records})}
    assert values[(6, "2x faster than SDPA on the concatenated cache", "P30-L4096-B8")] == "1.25x (ceiling 1.67x)"
    # The Triton decode path is the faster of its two kernels (here the decode kernel, 0.03 ms).
    assert got[(6, "faster than the Triton decode path", "P30-L4096-B8")] is False
    assert got[(6, "a decoding step (cache append + attention) 2x faster than HF's DynamicCache + SDPA",
                "P30-L4096-B8")] is True                                                                # 500x
    assert got[(6, "reads KV at 70% or more of the GPU's measured bandwidth", "P30-L4096-B8")] is True
    # The tensor-core kernel's row is judged beside the default kernel's, under its own name.
    assert got[(6, "2x faster than SDPA on the concatenated cache", "P30-L4096-B8 (tensor cores)")] is True    # 2.5x
    assert got[(6, "faster than the Triton decode path", "P30-L4096-B8 (tensor cores)")] is True
    assert got[(6, "faster than the Triton decode path", "P30-L4096-B8 (CUDA cores)")] is False
    assert got[(6, "generate() never slower than stock PEFT + sdpa", "qwen2.5-0.5b-B8")] is False             # 0.89x
    assert got[(6, "generate() never slower than stock PEFT + sdpa", "qwen2.5-0.5b-B8 (tensor cores)")] is True
    assert got[(6, "generate() never slower than stock PEFT + sdpa", "qwen2.5-0.5b-B8-static")] is True       # 5.9x
    assert got[(6, "generate() never slower than stock PEFT + sdpa", "llama3.2-1b-B8-static")] is None       # no stock row
    # Without device probes the relative targets have no data rather than a verdict.
    no_probe = {(t.issue, t.what, t.case): t.met for t in evaluate({"records": records[2:]})}
    assert no_probe[(3, "reads W2 at 70% or more of the GPU's measured bandwidth (fwd)", "llama3-8b")] is None


def test_an_unknown_case_name_is_a_usage_error_and_the_gpu_scripts_name_known_ones(capsys):
    """A misspelt --shapes name was skipped by every suite without a word (a GPU call spent on
    nothing); now a usage error. Every name run_gpu.sh passes to --shapes is one a suite has."""
    import re
    from pathlib import Path

    from prefixkern.bench.__main__ import known_case_names

    with pytest.raises(SystemExit) as exit_info:
        main(["--shapes", "llama8b-8k", "lama8b-2k"])
    assert exit_info.value.code == 2
    assert "--shapes: no suite has a case named lama8b-2k (known: " in capsys.readouterr().err
    script = (Path(__file__).resolve().parent.parent / "benchmarks" / "run_gpu.sh").read_text().replace("\\\n", " ")
    named = [name for match in re.finditer(r"--shapes((?:\s+[^\s$;-][^\s;]*)+)", script) for name in match[1].split()]
    assert len(named) > 10 and set(named) <= known_case_names(), sorted(set(named) - known_case_names())


def test_a_baseline_no_suite_run_has_is_named_after_the_run(tmp_path, capsys):
    """--baselines names rows; one that no suite run has (misspelt, or another suite's) was dropped
    without a word: the run now says so."""
    assert main(["--suite", "mlp", "--baselines", "torch_p_rows", "sdpa_mask", "torch_prows", "--no-plots",
                 "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "--baselines: no row named sdpa_mask, torch_prows in the suites run (mlp)" in err


@pytest.mark.parametrize("option", ["--targets", "--merge"])
def test_a_missing_results_file_is_a_usage_error(option, tmp_path, capsys):
    """(It was a FileNotFoundError traceback.)"""
    with pytest.raises(SystemExit) as exit_info:
        main([option, str(tmp_path / "nope.json")])
    assert exit_info.value.code == 2
    assert f"{option}: no such results file: {tmp_path / 'nope.json'}" in capsys.readouterr().err


def test_targets_of_the_committed_gpu_run(capsys):
    """The CLI reads the targets off a committed results file (the first H200 run)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "2026-11-26_NVIDIA-H200.json"
    assert main(["--targets", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| 2 | fwd+bwd at least as fast as the fastest baseline | llama8b-2k | 1.03x vs flex | yes |" in printed
    assert "| 6 | generate() never slower than stock PEFT + sdpa |" in printed
    # The second run's file (its probes in the same file: the relative targets are judged too).
    assert main(["--targets", str(path.with_name("2026-11-26_0656_NVIDIA-H200.json"))]) == 0
    printed = capsys.readouterr().out
    assert "| 2 | fwd+bwd peak memory below every baseline's | llama8b-2k | 69.5 MiB vs min 99.8 MiB | yes |" in printed
    assert "30.6% (1.27e+03 of 4.15e+03 GB/s)" in printed
    # The fourth run's (2026-11-26 evening): the static cache against stock PEFT's dynamic one.
    assert main(["--targets", str(path.with_name("2026-11-26_2039_NVIDIA-H200.json"))]) == 0
    printed = capsys.readouterr().out
    assert "| new64-static | 10.6x vs stock PEFT's dynamic cache (its static request failed) | yes |" in \
        printed.replace("qwen2.5-0.5b-B8-prompt512-", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of the device suite")
def test_device_suite_says_it_needs_a_gpu():
    from prefixkern.bench import device
    from prefixkern.bench.common import Options

    opts = Options(device=torch.device("cpu"), dtype=torch.bfloat16, quick=True, baselines=None, shapes=None,
                   on_gpu=False)
    records, skips = device.run(opts, lambda message: None)
    assert records == [] and len(skips) == 1 and "GPU" in skips[0].reason


def test_profile_ops_e2e_step_is_the_suites_step(capsys):
    """benchmarks/profile_ops.py e2e:MODEL profiles the e2e suite's training step (patched and
    stock): on the CPU's tiny Llama both give the same loss; generate:MODEL's call runs too, so
    the diagnostics stay runnable."""
    import sys
    from pathlib import Path

    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import profile_ops

    losses = [float(profile_ops._e2e_step("cpu-tiny-llama", impl, torch.float32, seq_len=8, batch=2, device="cpu")())
              for impl in ("prefixkern", "peft_sdpa")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    tokens = profile_ops._generate_call("cpu-tiny-llama", "prefixkern", torch.float32, batch=2, prompt=8, new_tokens=3,
                                        device="cpu")()
    assert tokens.shape == (2, 11)
    step = profile_ops._e2e_step("cpu-tiny-llama", "prefixkern", torch.float32, seq_len=8, batch=2, device="cpu")
    profile_ops._cprofile_call("e2e patched", step, 1)
    printed = capsys.readouterr().out
    assert "by own time" in printed and "prefixkern/integrations/hf.py" in printed


@pytest.mark.parametrize("shape", ["cpu-tiny", "cpu-tiny+autocast"])
def test_mlp_profile_step_of_pytorch_rows_matches_ours(shape):
    """``fused_step(p_rows=True)`` (profile_ops.py's ``mlp_p_rows:SHAPE``) runs the suite's
    torch_p_rows row: the same output and parameter gradients as our step, within bf16 rounding,
    with and without autocast."""
    from prefixkern.bench import mlp

    case = mlp.CPU_SHAPES[shape]
    results = []
    for p_rows in (False, True):
        torch.manual_seed(0)
        step = mlp.fused_step(case, "cpu", torch.bfloat16, p_rows=p_rows)
        out = step()
        grads = [p.grad for p in step.params]
        results.append((out.float(), [g.float() for g in grads]))
    (ours, our_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)
    for mine, other in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, other, atol=5e-2, rtol=5e-2)


def test_timing_gives_long_calls_their_repetitions():
    """do_bench sizes its loops in milliseconds: a 70 ms training step once got one timed call in a
    quick run. The budget keeps the short-call defaults and stretches for long calls."""
    from prefixkern.bench.common import MIN_REPS, bench_budget

    assert bench_budget(0.01, quick=True) == (10.0, 40.0)
    assert bench_budget(0.01, quick=False) == (25.0, 100.0)
    for quick in (True, False):
        warmup, rep = bench_budget(70.0, quick)
        assert warmup >= 2 * 70.0 and int(rep / 70.0) >= MIN_REPS[quick] >= 10


def test_bandwidth_targets_take_the_higher_of_the_copy_and_read_probes():
    """A read-only kernel's share is of the higher of the copy rate and the read rate; the 128 MiB
    flush-comparison rows are not a probe (after do_bench's flush they read low, after ours high)."""
    from prefixkern.bench.targets import evaluate

    what = "reads KV at 70% or more of the GPU's measured bandwidth"
    rows = [_rec("device", "copy-512MiB", "torch", "fwd", ms=1.0, gbps=4000.0),
            _rec("decode", "P30-L4096-B8", "prefixkern", "fwd", ms=0.04, gbps=3000.0)]
    flush_rows = [_rec("device", "read-128MiB", "torch_read_flush", "fwd", ms=1.0, gbps=9000.0),
                  _rec("device", "read-128MiB", "torch_zero_flush", "fwd", ms=1.0, gbps=100.0)]

    def judged(records):
        return next((t.met, t.value) for t in evaluate({"records": records}) if t.what == what)

    assert judged(rows + flush_rows) == (True, "75% (3e+03 of 4e+03 GB/s)")
    read = _rec("device", "read-512MiB", "torch", "fwd", ms=1.0, gbps=4500.0)
    assert judged(rows + flush_rows + [read]) == (False, "66.7% (3e+03 of 4.5e+03 GB/s)")
    # A row timed after the other flush too (its note) shows that share beside the verdict.
    from prefixkern.bench.common import flush_note

    rows[1]["note"] = flush_note("zero", 0.06, int(0.06e-3 * 2250e9))       # 2250 GB/s
    assert judged(rows + [read]) == (False, "66.7% (3e+03 of 4.5e+03 GB/s); 50% after a zero flush")


def test_timed_calls_can_be_kept_for_their_spread(monkeypatch):
    """A training step's row keeps every timed call (host-bound steps on a shared GPU host spread:
    the raw-launch row read 15% slower than the plain one in a run that kept only medians)."""
    from prefixkern.bench import common
    from prefixkern.bench.common import spread_note, time_ms

    flushes = []
    monkeypatch.setattr(common, "timed_calls", lambda fn, warmup, rep, flush: (flush(), [3.0, 1.0, 2.0, 10.0])[1])
    monkeypatch.setattr(common, "flush_l2", lambda mode=None: flushes.append(mode))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    samples = []
    assert time_ms(lambda: None, on_gpu=True, quick=True, samples=samples) == 2.5     # the median
    assert samples == [1.0, 2.0, 3.0, 10.0]
    assert time_ms(lambda: None, on_gpu=True, quick=True, flush="zero") == 2.5
    assert flushes == [None, "zero"]          # the run's flush (L2_FLUSH), or the one asked for
    assert spread_note(samples) == "4 timed calls, ms: min 1, quartiles 1.25 / 2.5 / 8.25, max 10"


class _FakeCudaClock:
    """CUDA events and ``synchronize`` stood in for on the CPU: an event reads ``now`` (ms, which the
    test advances) when recorded, and each record is appended to ``log``."""

    def __init__(self, monkeypatch):
        self.now, self.log = 0.0, []
        clock = self

        class Event:
            def __init__(self, enable_timing):
                assert enable_timing
                self.at = None

            def record(self):
                self.at = clock.now
                clock.log.append("record")

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.at - self.at

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_generate_rows_are_timed_in_interleaved_rounds(monkeypatch):
    """The decode suite's generate() rows: every row's calls in rounds that take each row in turn
    (drift reaches them alike), each row's time the best of its calls, its peak memory its own
    model's weights plus the most one of its calls allocated above what was resident."""
    from prefixkern.bench import decode
    from prefixkern.bench.common import Record

    import time

    clock = _FakeCudaClock(monkeypatch)
    monkeypatch.setattr(time, "perf_counter", lambda: clock.now / 1e3)     # (the rounds' wall clock, in s)
    allocated = {"now": 1000, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=allocated["now"]))

    def row(name, ms_per_round, extra_bytes):
        calls = iter(ms_per_round)

        def generate():
            clock.now += next(calls)
            clock.log.append(name)
            allocated["peak"] = allocated["now"] + extra_bytes
        return Record("decode", "case", name, "generate", "bfloat16"), generate, torch.nn.Linear(4, 4, bias=False)

    timed = [row("peft_sdpa", [30.0, 20.0, 25.0], 2**20), row("prefixkern", [12.0, 18.0, 10.0], 3 * 2**20)]
    decode._time_generate_interleaved(timed, tokens=100, repeats=3)
    assert [entry for entry in clock.log if entry != "record"] == ["peft_sdpa", "prefixkern"] * 3
    (stock, _, _), (ours, _, model) = timed
    # (the wall clock's seconds back to ms: equal to the last bits of a float)
    assert (stock.ms, ours.ms) == pytest.approx((20.0, 10.0), rel=1e-12)
    assert ours.tokens_per_s == pytest.approx(100 / 10e-3)
    assert ours.peak_mem_mb == pytest.approx((16 * 4 + 3 * 2**20) / 2**20)
    assert "12, 18, 10 ms" in ours.note and "rounds" in ours.note


def test_timed_calls_flush_the_l2_before_every_timed_call(monkeypatch):
    """do_bench's loop with our flush: a call, five flushed calls for the estimate, warm-up calls
    for ``warmup`` ms, then ``rep`` ms of calls, each flushed first and timed alone between its two
    events (the flush outside them)."""
    from prefixkern.bench import common

    clock = _FakeCudaClock(monkeypatch)

    def fn():
        clock.now += 2.0
        clock.log.append("fn")

    def flush():
        clock.now += 1.0
        clock.log.append("flush")

    # The estimate counts the flush (3 ms a call): 9 ms of repetitions is 3 timed calls, 6 ms of warm-up 2.
    assert common.timed_calls(fn, warmup=6.0, rep=9.0, flush=flush) == [2.0, 2.0, 2.0]
    assert clock.log == (["fn", "record"] + ["flush", "fn"] * 5 + ["record"] + ["fn"] * 2
                         + ["flush", "record", "fn", "record"] * 3)


def test_the_l2_flush_reads_by_default_and_zeroes_as_do_bench_on_request(monkeypatch):
    """The default flush reads its 256 MiB (a sum: no dirty line left for the timed call to write
    back); "zero" writes it as do_bench does; anything else is refused, naming the setting."""
    from prefixkern.bench import common

    buffer = torch.ones(64)
    monkeypatch.setattr(common, "_flush_buffer", lambda device_index: buffer)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert common.L2_FLUSH == "read" and common.FLUSH_BYTES == 256 * 2**20
    common.flush_l2()
    assert torch.equal(buffer, torch.ones(64))          # read, not written
    common.flush_l2("zero")
    assert not buffer.any()
    with pytest.raises(ValueError, match="PREFIXKERN_BENCH_FLUSH"):
        common.flush_l2("evict")


def test_results_say_which_l2_flush_timed_them(tmp_path, monkeypatch):
    """The header of a results table names the flush; a merged file lists its steps' flushes, an
    older file's (before the setting existed) counting as do_bench's."""
    from prefixkern.bench import common

    monkeypatch.setattr(common, "L2_FLUSH", "zero")
    payload = common._payload([], [], torch.device("cpu"), "prefixkern-bench --l2-flush zero")
    assert payload["l2_flush"] == "zero"
    assert "L2 flush" not in common.markdown_table(payload)       # nothing timed (a CPU demo)
    timed = Record("device", "read-512MiB", "torch", "fwd", "float32", ms=0.1)
    payload = common._payload([timed], [], torch.device("cpu"), "prefixkern-bench --l2-flush zero")
    assert "- L2 flush before each timed call: zero (256 MiB zeroed, as do_bench does)" in \
        common.markdown_table(payload)
    files = []
    for i, flush in enumerate(("read", None)):
        step = {"device": "NVIDIA H200", "versions": {}, "date": f"2026-11-2{i}T00:00:00+00:00",
                "command": f"step {i}", "records": [timed.as_json()], "skipped": []}
        if flush:
            step["l2_flush"] = flush
        files.append(tmp_path / f"step{i}.json")
        files[-1].write_text(json.dumps(step))
    paths = common.merge_results(files, tmp_path / "merged", plots=False)
    assert json.loads(paths["json"].read_text())["l2_flush"] == "read ; zero"
    assert "read (256 MiB read); zero (256 MiB zeroed, as do_bench does) (the merged steps differ" in \
        paths["md"].read_text()


def test_decoding_step_rows_note_their_time_back_to_back(monkeypatch):
    """do_bench's L2 flush before each timed call hides up to the flush's GPU time of a host-bound
    call's host work; a decoding step row also notes its mean over calls made back to back, as
    generate() makes them. Fake CUDA events here: the mean is the events' span over the calls."""
    from prefixkern.bench import common, decode
    from prefixkern.bench.common import Options

    clock = _FakeCudaClock(monkeypatch)
    calls = []

    def fn():
        calls.append(1)
        clock.now += 0.25

    assert common.back_to_back_ms(fn, calls=8) == pytest.approx(0.25) and len(calls) == 9   # one warm-up call

    pytest.importorskip("transformers")

    def timed(opts, record, fn, expected):
        fn()
        record.ms, record.ok = 1.0, True
        return record

    monkeypatch.setattr(decode, "_checked_and_timed", timed)
    monkeypatch.setattr(decode, "back_to_back_ms", lambda fn: 0.125)
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, baselines=None, shapes=None,
                   on_gpu=False)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    pk, pv = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    cat_k, cat_v = torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    records, _ = decode._run_steps(opts, lambda message: None, "tiny", q, k, v, pk, pv, cat_k, cat_v,
                                   lambda *size: torch.randn(*size))
    assert {r.impl for r in records} == {"prefixkern", "hf_dynamic_cache_sdpa"}
    assert all(r.note.startswith("back to back: 0.125 ms a call (100 calls") for r in records)


def test_decode_rows_note_their_time_after_the_other_l2_flush(monkeypatch):
    """In a full run every decode fwd row is timed again after the flush the run does not use, its
    time and GB/s of KV in the note: issue 6's bandwidth measured both ways in one run. --quick
    leaves that out (OTHER_FLUSH_IN_FULL_RUNS)."""
    from prefixkern.bench import common, decode
    from prefixkern.bench.common import Options

    flushes = []

    def timed(opts, record, fn, expected):
        fn()
        record.ms, record.ok = 1.0, True
        return record

    monkeypatch.setattr(decode, "_checked_and_timed", timed)
    monkeypatch.setattr(decode, "time_ms", lambda fn, **kw: flushes.append(kw["flush"]) or 2.0)
    monkeypatch.setattr(decode, "back_to_back_ms", lambda fn: 0.125)
    quick = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, baselines=("sdpa_concat",),
                    shapes=None, on_gpu=False)
    records, _ = decode.run(quick, lambda message: None)
    assert flushes == [] and not any("after a zero flush" in (r.note or "") for r in records)
    opts = dataclasses.replace(quick, quick=False)
    records, _ = decode.run(opts, lambda message: None)
    rows = [r for r in records if r.pass_ == "fwd"]
    assert rows and flushes == ["zero"] * len(rows)
    assert all("after a zero flush (256 MiB zeroed, as do_bench does): 2 ms, " in r.note for r in rows)
    monkeypatch.setattr(common, "L2_FLUSH", "zero")
    flushes.clear()
    records, _ = decode.run(opts, lambda message: None)
    assert flushes == ["read"] * len(rows)
    assert all("after a read flush (256 MiB read): 2 ms" in r.note for r in records if r.pass_ == "fwd")
    # The second timing failing is noted; the row's own figures stand.
    def broken(fn, **kw):
        raise RuntimeError("out of memory")

    note = common.other_flush_note(broken, lambda: None, 1)
    assert note == "after a read flush: failed (RuntimeError: out of memory)"


def test_decoding_step_row_appends_as_generate_does(monkeypatch):
    """The prefixkern step row drops the previous call's token by restoring the prefill's views,
    and the views the layer last left: every timed call then appends as generate()'s next step
    does, without checking the views' memory and layout (_has_head_of, the path of a cache that
    something else changed), and attends over the prefill and one new token each time (the
    expected result, every call)."""
    pytest.importorskip("transformers")
    from prefixkern.bench import decode
    from prefixkern.bench.common import Options
    from prefixkern.integrations import hf_cache

    checked = []
    has_head_of = hf_cache._has_head_of
    monkeypatch.setattr(hf_cache, "_has_head_of", lambda *args: checked.append(1) or has_head_of(*args))

    def timed(opts, record, fn, expected):
        for _ in range(3):
            out = fn()
            torch.testing.assert_close(out, expected)
        record.ms, record.ok = 1.0, True
        return record

    monkeypatch.setattr(decode, "_checked_and_timed", timed)
    monkeypatch.setattr(decode, "back_to_back_ms", lambda fn: 0.125)
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, baselines=("prefixkern",),
                   shapes=None, on_gpu=False)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    pk, pv = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    cat_k, cat_v = torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    records, _ = decode._run_steps(opts, lambda message: None, "tiny", q, k, v, pk, pv, cat_k, cat_v,
                                   lambda *size: torch.randn(*size))
    assert [r.impl for r in records] == ["prefixkern"] and not checked, (records, len(checked))


def test_raw_launch_row_is_timed_interleaved_with_the_plain_launch(monkeypatch):
    """The raw-launch decision compares two host-bound rows: alternating rounds on one model take
    drift out of the comparison. Fake steps of 3 and 1 ms: every call counted, raw read faster."""
    import time

    from prefixkern.bench.e2e import interleaved_note

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    order = []

    def plain():
        order.append("plain")
        time.sleep(0.003)

    def raw():
        order.append("raw")
        time.sleep(0.001)

    note = interleaved_note(plain, raw, rounds=2, calls=2)
    assert order == ["plain"] * 2 + ["raw"] * 2 + ["plain"] * 2 + ["raw"] * 2
    ratio = float(note.rsplit("raw/plain ", 1)[1].rstrip(")"))
    assert note.startswith("interleaved with the plain launch on this model (2 rounds of 2 steps each)")
    assert ratio < 0.8 and "launch plans" not in note

    # With the plain launch without launch plans as a third turn (9 ms here: far enough from the
    # plain launch's 3 that a loaded machine's late wake-ups keep the order).
    def unplanned():
        order.append("unplanned")
        time.sleep(0.009)

    order.clear()
    note = interleaved_note(plain, raw, unplanned, rounds=3, calls=1)
    assert order == ["plain", "raw", "unplanned"] * 3
    assert float(note.rsplit("raw/plain ", 1)[1].rstrip(")")) < 0.8
    assert float(note.split("plain/unplanned ", 1)[1].split(")", 1)[0]) < 0.8


def test_raw_launch_default_follows_the_checked_triton_releases(monkeypatch):
    """The raw-pointer launch is the default on the Triton releases whose launcher convention a
    GPU run checked (3.6), the plain launch elsewhere; PREFIXKERN_RAW_LAUNCH forces either. Where
    it is the default the prefixkern row launches raw: the prefixkern_raw_launch row is skipped as
    the same row, and the e2e suite's interleaved raw/plain note moves to the prefixkern row."""
    from prefixkern.bench import e2e
    from prefixkern.bench.common import Options, launch_path_skip
    from prefixkern.kernels import _launch

    monkeypatch.delenv("PREFIXKERN_RAW_LAUNCH", raising=False)
    for version, default in (("3.6.0", True), ("3.6.1+git", True), ("3.5.1", False), ("3.9.0", False),
                             ("3.60.0", False)):
        monkeypatch.setattr(_launch.triton, "__version__", version)
        assert _launch._raw_pointers_default() is default, version
        monkeypatch.setenv("PREFIXKERN_RAW_LAUNCH", "0" if default else "1")
        assert _launch._raw_pointers_default() is not default, version
        monkeypatch.delenv("PREFIXKERN_RAW_LAUNCH")

    on_gpu = Options(torch.device("cpu"), torch.bfloat16, True, None, None, True)
    on_cpu = Options(torch.device("cpu"), torch.bfloat16, True, None, None, False)
    monkeypatch.setattr(_launch, "RAW_POINTERS", True)
    raw, plain = "prefixkern_raw_launch", "prefixkern_plain_launch"
    assert "launches raw already" in launch_path_skip(on_gpu, raw) and "need a GPU" in launch_path_skip(on_cpu, raw)
    assert launch_path_skip(on_gpu, plain) is None and "need a GPU" in launch_path_skip(on_cpu, plain)
    assert e2e._raw_launch_row() == "prefixkern"
    monkeypatch.setattr(_launch, "RAW_POINTERS", False)
    assert launch_path_skip(on_gpu, raw) is None
    assert "launches plain already" in launch_path_skip(on_gpu, plain)
    assert e2e._raw_launch_row() == "prefixkern_raw_launch"


def test_e2e_case_is_timed_again_with_the_floor_and_stock_peft_side_by_side(monkeypatch):
    """On a GPU every training case gets a "<case>-interleaved" copy: the floor, stock PEFT + sdpa
    and the patched model built together and timed in turns (rows timed minutes apart carry a
    shared host's drift into the issue's floor ratio). Run here with the GPU's timing calls faked:
    the steps alternate, each record keeps its row's loss check, and the targets read the copy."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from prefixkern.bench import common, e2e
    from prefixkern.bench.common import Options
    from prefixkern.bench.targets import evaluate

    monkeypatch.setattr(common, "timed_calls", lambda fn, warmup, rep, flush: [5.0, 6.0, 7.0])
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    monkeypatch.setattr(e2e, "INTERLEAVED_ROUNDS", 2)
    monkeypatch.setattr(e2e, "INTERLEAVED_CALLS", 1)
    monkeypatch.setattr(e2e, "RAGGED_LENGTHS", {})
    monkeypatch.setattr(e2e, "LENGTHS", {16: 2})
    calls = []
    real_step_fn = e2e._step_fn

    def step_fn(model, impl, *args):
        step = real_step_fn(model, impl, *args)

        def logged():
            calls.append(impl)
            return step()
        return logged

    monkeypatch.setattr(e2e, "_step_fn", step_fn)
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=False,
                   baselines=("floor_no_prefix", "peft_eager", "peft_sdpa", "prefixkern"), shapes=("cpu-tiny-llama",),
                   on_gpu=True)
    records, skips = e2e.run(opts, lambda message: None)
    assert not [s for s in skips if "interleaved" in s.case], skips
    rows = {r.impl: r for r in records if r.case == "cpu-tiny-llama-S16"}
    again = {r.impl: r for r in records if r.case == "cpu-tiny-llama-S16-interleaved"}
    assert set(again) == {"floor_no_prefix", "peft_sdpa", "prefixkern"} and "peft_eager" in rows
    turns = ["floor_no_prefix", "peft_sdpa", "prefixkern"]
    assert calls[-9:] == turns + turns * 2        # a warm-up step each, then two rounds in turn
    for impl, record in again.items():
        assert record.pass_ == "step" and record.ms > 0 and record.tokens_per_s == pytest.approx(32 / (record.ms * 1e-3))
        assert (record.max_err, record.ok) == (rows[impl].max_err, rows[impl].ok)
        assert record.note.startswith("timed side by side with ") and "2 timed calls" in record.note
    assert rows["prefixkern"].ok is True
    judged = {(t.what, t.case) for t in evaluate({"records": [r.as_json() for r in records]})}
    assert ("step within 5% of the floor's time", "cpu-tiny-llama-S16-interleaved") in judged
    assert ("same loss as stock PEFT on the same batch", "cpu-tiny-llama-S16-interleaved") not in judged


def test_a_failing_prefixkern_training_step_is_a_failed_row_and_the_suite_goes_on(monkeypatch):
    """Our step raising (a kernel failing on some GPU stack, say) is a failed row with the error,
    not a crash that loses the suite's later rows."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from prefixkern.bench import e2e
    from prefixkern.bench.common import Options

    real_step_fn = e2e._step_fn

    def step_fn(model, impl, *args):
        if impl != "prefixkern":
            return real_step_fn(model, impl, *args)

        def broken():
            raise RuntimeError("kernel failed")
        return broken

    real_measure = e2e.measure_step

    def measure(opts, record, *args, **kwargs):   # the ragged SFT case: the packed row fails
        if record.impl == "prefixkern_packed":
            raise RuntimeError("packed kernel failed")
        return real_measure(opts, record, *args, **kwargs)

    monkeypatch.setattr(e2e, "_step_fn", step_fn)
    monkeypatch.setattr(e2e, "measure_step", measure)
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True,
                   baselines=("peft_eager", "prefixkern", "peft_sdpa", "prefixkern_packed"), shapes=None, on_gpu=False)
    records, _ = e2e.run(opts, lambda message: None)
    ours = [r for r in records if r.impl == "prefixkern" and r.pass_ == "step" and "kernel failed" in (r.note or "")]
    assert ours and all(r.ok is False for r in ours)
    later = {r.impl for r in records if r.case == ours[0].case}
    assert "peft_sdpa" in later                 # the row after ours in the suite's order was still timed
    packed = [r for r in records if r.impl == "prefixkern_packed"]
    assert packed and all(r.ok is False and "packed kernel failed" in r.note for r in packed)
    assert any(r.case == "cpu-tiny-roberta-S16" for r in records)   # the next model still ran


def test_a_failing_attention_row_is_a_failed_row():
    """A kernel or a baseline's compiler raising is a failed row with the error (the suite goes on
    to its other rows and shapes); the SIGTERM stop, a BaseException, still passes through."""
    from types import SimpleNamespace

    from prefixkern.bench import attention
    from prefixkern.bench.common import Options

    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, baselines=None, shapes=None,
                   on_gpu=False)
    leaves = [torch.zeros(1, requires_grad=True)]

    def broken(*args):
        raise RuntimeError("triton compile failed")

    record = attention.measure(opts, SimpleNamespace(name="tiny"), "fwd", "flex", broken, leaves, None,
                               torch.zeros(1), None, 1.0)
    assert record.ok is False and record.ms is None and "RuntimeError: triton compile failed" in record.note

    def stopped(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attention.measure(opts, SimpleNamespace(name="tiny"), "fwd", "flex", stopped, leaves, None, torch.zeros(1),
                          None, 1.0)


def test_failing_mlp_and_decode_rows_are_failed_rows(monkeypatch):
    from prefixkern.bench import decode, mlp
    from prefixkern.bench.common import Options

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(mlp, "fused_prefix_mlp", broken)
    monkeypatch.setattr(decode, "prefix_attention", broken)
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, baselines=None,
                   shapes=("cpu-tiny",), on_gpu=False)
    for suite, failing, fine in ((mlp, "prefixkern", "torch_p_rows"), (decode, "prefixkern_triton", "sdpa_concat")):
        records, _ = suite.run(opts, lambda message: None)
        rows = {(r.impl, r.pass_): r for r in records}
        failed = [r for (impl, _), r in rows.items() if impl == failing]
        assert failed and all(r.ok is False and "RuntimeError: kernel failed" in r.note for r in failed)
        assert any(impl == fine and r.ok for (impl, _), r in rows.items())


def test_e2e_loss_check_takes_dropout_free_losses():
    """The training-step suite compares each row's loss with stock PEFT's. RoBERTa trains with
    dropout, whose masks the rows draw differently (torch's generator, the kernel's Philox): the
    checked loss is taken with dropout off (the timed steps keep it), so the rows agree at float32
    tolerance, where with dropout on they differed by 0.5%."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from prefixkern.bench import e2e
    from prefixkern.bench.common import Options

    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=False, shapes=None, on_gpu=False,
                   baselines=("peft_eager", "prefixkern"))
    records, _ = e2e.run(opts, lambda message: None)
    rows = {(r.case, r.impl): r for r in records}
    roberta = rows[("cpu-tiny-roberta-S16", "prefixkern")]
    assert roberta.ok and roberta.max_err <= 1e-5 and "dropout off" in roberta.note, roberta
    llama = rows[("cpu-tiny-llama-S16", "prefixkern")]
    assert llama.ok and "dropout off" not in llama.note        # no dropout: no second mode to compile
    assert e2e.has_dropout(e2e.build_model("cpu-tiny-roberta", "prefixkern", opts, _tiny_state("cpu-tiny-roberta")))
    assert not e2e.has_dropout(e2e.build_model("cpu-tiny-llama", "prefixkern", opts, _tiny_state("cpu-tiny-llama")))


def _tiny_state(name):
    from prefixkern.bench import e2e

    torch.manual_seed(0)
    return e2e.model_class(name).from_config(e2e.model_config(name)).state_dict()


def test_mlp_autocast_cases_need_a_16_bit_dtype():
    """An ``+autocast`` MLP case under ``--dtypes float32`` would run without autocast (torch.autocast
    warns and turns itself off) under its autocast name: skipped with the reason instead."""
    from prefixkern.bench import mlp
    from prefixkern.bench.common import Options

    def run(dtype):
        opts = Options(device=torch.device("cpu"), dtype=dtype, quick=True, baselines=None, shapes=None, on_gpu=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*autocast.*")
            records, skips = mlp.run(opts, lambda message: None)
        return {r.case for r in records}, {(s.case, s.impl): s.reason for s in skips}

    cases, skips = run(torch.float32)
    assert cases == {"cpu-tiny"} and "float16 or bfloat16, not float32" in skips[("cpu-tiny+autocast", "all")]
    cases, skips = run(torch.bfloat16)
    assert cases == {"cpu-tiny", "cpu-tiny+autocast"} and ("cpu-tiny+autocast", "all") not in skips


def test_quick_decode_leaves_the_losing_opt_in_variants_out_unless_named():
    from prefixkern.bench import decode
    from prefixkern.bench.common import Options

    def reasons(quick, baselines):
        opts = Options(device=torch.device("cpu"), dtype=torch.bfloat16, quick=quick, baselines=baselines,
                       shapes=("cpu-tiny",), on_gpu=False)
        return {s.impl: s.reason for s in decode.run(opts, lambda message: None)[1] if s.case == "cpu-tiny"}

    quick = reasons(True, None)
    for impl in decode.OPT_IN_IMPLS:
        assert "--quick leaves the opt-in decode variants out" in quick[impl]
    named = reasons(True, decode.OPT_IN_IMPLS)
    full = reasons(False, None)
    for impl in decode.OPT_IN_IMPLS:       # asked for: timed where they can run (here: no GPU, so skipped for that)
        assert "--quick" not in named[impl] and "--quick" not in full[impl]


@pytest.mark.parametrize("setting", [None, True, False])
def test_decode_times_the_kernel_the_default_does_not_run(monkeypatch, setting):
    """The decode suite's other-kernel rows: at a head dim whose default is the tensor-core kernel
    (128, with PREFIXKERN_DECODE_TENSOR_CORES unset) it times the CUDA-core one as
    prefixkern_cuda_cores and skips prefixkern_tensor_cores as the prefixkern row, and the reverse
    at a head dim whose default is the CUDA-core kernel (256 under a table without it, as before the
    seventh H200 run); forced either way, the forced kernel is the prefixkern row at both. Where the
    tensor-core kernel cannot run, neither row is timed (the prefixkern row runs the CUDA-core
    kernel), nor without a GPU."""
    from prefixkern.bench import decode
    from prefixkern.bench.common import Options
    from prefixkern.ops import decode_attention

    monkeypatch.setattr(decode_attention, "TENSOR_CORES", setting)
    monkeypatch.setattr(decode_attention, "TENSOR_CORE_HEAD_DIMS", (64, 128))
    monkeypatch.setattr(decode, "_tensor_cores_skip", lambda opts: None)
    cpu = Options(device=torch.device("cpu"), dtype=torch.bfloat16, quick=True, baselines=None, shapes=None,
                  on_gpu=False)
    assert all("run on a GPU" in decode._other_kernel_skip(cpu, impl, 128) for impl in decode.OTHER_KERNEL_ROWS)
    opts = Options(device=torch.device("cpu"), dtype=torch.bfloat16, quick=True, baselines=None, shapes=None,
                   on_gpu=True)      # (a GPU run's options; the skips read no tensor)
    for head_dim in (128, 256):
        tensor_cores = head_dim == 128 if setting is None else setting
        same, other = ("prefixkern_tensor_cores", "prefixkern_cuda_cores") if tensor_cores else (
            "prefixkern_cuda_cores", "prefixkern_tensor_cores")
        assert "runs the" in decode._other_kernel_skip(opts, same, head_dim)
        assert decode._other_kernel_skip(opts, other, head_dim) is None
    monkeypatch.setattr(decode, "_tensor_cores_skip", lambda opts: "cannot run here")
    assert all(decode._other_kernel_skip(opts, impl, d) for impl in decode.OTHER_KERNEL_ROWS for d in (128, 256))


def test_a_failing_prefixkern_generate_is_a_failed_row_and_the_suite_goes_on(monkeypatch):
    """generate() of ours raising (say, a compilation failing on some GPU stack) gives a failed row
    with the error, not a crash of the decode suite: the other rows are still timed and written."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from prefixkern.bench import decode
    from prefixkern.bench.common import Options
    from prefixkern.integrations import hf

    def broken(*args, **kwargs):
        raise RuntimeError("compilation failed")

    monkeypatch.setattr(hf, "_static_prepare_inputs", broken)
    opts = Options(device=torch.device("cpu"), dtype=torch.bfloat16, quick=True, baselines=("prefixkern",),
                   shapes=None, on_gpu=False)
    records, _ = decode.run_generate(opts, lambda message: None)
    rows = {r.case: r for r in records if r.impl == "prefixkern"}
    static = rows["cpu-tiny-llama-B2-prompt12-new4-static"]
    assert static.ok is False and "RuntimeError: compilation failed" in static.note
    assert rows["cpu-tiny-llama-B2-prompt12-new4"].ok is not False      # (no eager reference asked for)



def _ncu_ops():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ncu_ops.py"
    spec = importlib.util.spec_from_file_location("ncu_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ncu_ops_targets_run_and_say_when_they_cannot(capsys):
    """benchmarks/ncu_ops.py, the runbook's Nsight Compute target: off a GPU it exits 2 with its reason;
    its targets' calls run on the CPU (the MLP through the reference, SDPA) or say why not (the CUDA
    decode kernel)."""
    import argparse

    ncu = _ncu_ops()
    if not torch.cuda.is_available():
        assert ncu.main(["decode"]) == 2 and "no CUDA GPU here" in capsys.readouterr().err
    mlp = argparse.Namespace(target="mlp", shape="cpu-tiny", calls=2)
    assert ncu.run(mlp, "cpu") == 0 and "mlp cpu-tiny fwd+bwd" in capsys.readouterr().out
    decode = dict(target="decode", prefix=3, cache=8, batch=2, calls=2)
    assert ncu.run(argparse.Namespace(impl="sdpa_concat", **decode), "cpu") == 0
    assert ncu.run(argparse.Namespace(impl="prefixkern", **decode), "cpu") == 2
    assert "does not serve this call" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("argv", [["decode", "--cache", "512", "--batch", "2"],
                                  ["decode", "--impl", "sdpa_concat", "--cache", "512", "--batch", "2"],
                                  ["mlp", "--shape", "qwen2.5-0.5b"]])
def test_gpu_ncu_ops_runs_its_calls(argv, capsys):
    """The script the runbook runs under ncu: its calls run, outside ncu too."""
    assert _ncu_ops().main(["--calls", "2", *argv]) == 0
    assert "2 calls, the last between cudaProfilerStart and cudaProfilerStop" in capsys.readouterr().out


def test_mlp_interleaved_note_times_both_in_turn(monkeypatch):
    """The MLP suite's side-by-side reading of ours against PyTorch's P-row MLP: the two calls
    alternate round by round, and the note gives both medians, their ratio and the rounds' spread
    (time_ms stood in for: scripted milliseconds, in the order the calls are made)."""
    from prefixkern.bench import mlp

    order, script = [], iter([1.0, 2.0, 1.0, 3.0, 2.0, 2.0])
    monkeypatch.setattr(mlp, "time_ms", lambda fn, **kw: (order.append(fn()), next(script))[1])
    note = mlp.interleaved_note(lambda: "ours", lambda: "theirs", rounds=3)
    assert order == ["ours", "theirs"] * 3
    assert note == "interleaved with torch_p_rows (3 rounds): 1 against 2 ms, 2x (rounds 1-3x)"


def test_decode_grid_times_other_head_layouts():
    """The decode suite's GPU grid, --quick and full, has a point at Qwen2.5-0.5B's heads (head dim
    64) and one at head dim 256 beside the Llama-3-8B grid: their rows of the other kernel (the
    CUDA-core one, now that the tensor-core kernel is the default at all three) keep the seventh
    H200 run's decision checked."""
    from prefixkern.bench import decode
    from prefixkern.bench.common import Options
    from prefixkern.ops import decode_attention
    from prefixkern.ops.decode_attention import tensor_cores_by_default

    for quick in (True, False):
        opts = Options(device=torch.device("cpu"), dtype=torch.bfloat16, quick=quick, baselines=None, shapes=None,
                       on_gpu=True)
        cases = decode._cases(opts)
        assert len(cases) == (len(decode.QUICK) if quick else 18) + 2
        assert {case[3] for case in cases} == {64, 128, 256}
        others = [case for case in cases if case[3] != 128]
        assert [case[0] for case in others] == ["qwen-heads-P30-L4096-B8", "d256-heads-P30-L4096-B8"]
        if decode_attention.TENSOR_CORES is None:     # (PREFIXKERN_DECODE_TENSOR_CORES unset)
            assert [tensor_cores_by_default(case[3]) for case in cases] == [True] * len(cases)
            assert all(decode._other_kernel_skip(opts, "prefixkern_tensor_cores", case[3]) for case in cases)


def test_the_gpu_session_script_names_tests_and_steps_that_exist():
    """benchmarks/gpu_session.sh is run blind on a lent GPU: a renamed test or step there would
    cost a device call that collects nothing. Every test node it names exists, its -k selection
    picks some of them, every fuzzer kind it runs exists, and every run_gpu.sh step it asks for is
    one that script knows."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = (root / "benchmarks" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(root / "benchmarks" / "gpu_session.sh")]).returncode == 0
    nodes = re.findall(r"(tests/\w+\.py)::(\w+)", script)
    assert nodes
    for path, name in nodes:
        assert re.search(rf"^def {name}\(", (root / path).read_text(), re.M), f"{path}::{name} is not a test"
    # The test call's -k selection picks tests (a typo there would select none, and pytest exits 5).
    for selection in re.findall(r'-k "([^"]+)"', script):
        collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                    *{f"{path}::{name}" for path, name in nodes}, "-k", selection],
                                   cwd=root, capture_output=True, text=True)
        found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", collected.stdout)
        assert found and int(found.group(1)) > 0, collected.stdout[-2000:]
    # The fuzzer's runs name kinds it has.
    fuzz = (root / "tests" / "tools" / "fuzz_kernels.py").read_text()
    kinds = re.findall(r'"([a-z-]+) (?:--[a-z]+ )*--cases \d+ --seed \d+:\d+"', script)
    assert kinds
    for kind in kinds:
        assert f'"{kind}": ' in fuzz, f"fuzz_kernels.py has no kind {kind}"
    run_gpu = (root / "benchmarks" / "run_gpu.sh").read_text()
    steps = re.findall(r"run_gpu\.sh \"\$R\" ([^\n]+)", script)
    assert steps
    for step in " ".join(steps).split():
        name = step.split(":")[0]
        assert re.search(rf"^\s+(\S+\|)*{re.escape(name)}(\|\S+)*\)", run_gpu, re.M), f"run_gpu.sh has no step {name}"
