"""``prefixkern-bench``: run the benchmark suites, check every result, write the results.

    prefixkern-bench                       # every suite, every shape, bf16 (on a GPU)
    prefixkern-bench --quick               # a few shapes per suite, a few minutes
    prefixkern-bench --suite attention --shapes llama8b-2k llama8b-8k --baselines sdpa_lower_right flex
    prefixkern-bench --targets benchmarks/results/2026-11-26_0656_NVIDIA-H200.json   # the issues' targets

Without a GPU it runs a small correctness demo of the same pipeline through Triton's interpreter
and says so: no speed figure is reported from a CPU.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import shlex
import signal
import sys
import time
from pathlib import Path


class _Stopped(BaseException):
    """SIGTERM arrived: stop timing and write what has been timed. A BaseException, like
    KeyboardInterrupt, so that no baseline's ``except Exception`` takes it for its own failure."""


def _stop_on_sigterm(signum, frame):
    raise _Stopped()


def _dump_stacks_at_sigterm() -> bool:
    """At SIGTERM, first write every thread's Python stack to the process's stderr, from C, then
    run the Python handler: a step that stalls where that handler never runs (a wait inside C++)
    still says where it was. False where stderr has no file descriptor (captured output)."""
    try:
        faulthandler.register(signal.SIGTERM, file=sys.__stderr__, all_threads=True, chain=True)
    except (AttributeError, OSError, ValueError):      # io.UnsupportedOperation is both of the last two
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    from .common import L2_FLUSHES, SUITES

    parser = argparse.ArgumentParser(prog="prefixkern-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=SUITES + ("all",), default=["all"], help="suites to run")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="case names (attention: seed-qwen seed-bloom paper-gpt2 llama8b-2k llama8b-8k long-32k "
                             "packed-qwen packed-llama8b gpt2-medium-dropout; "
                             "mlp: qwen2.5-0.5b bloomz-560m llama3-8b; e2e_train: qwen2.5-0.5b bloomz-560m "
                             "gpt2-medium llama3.2-1b roberta-large; decode: P30-L4096-B8 ...)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--baselines", nargs="+", default=None,
                        help="only these baselines (eager sdpa_mask sdpa_lower_right sdpa_lower_right_gqa flex "
                             "flash_attn prefixkern_padded prefixkern_packed torch_p_rows peft_encoder prefixkern_fma sdpa_concat "
                             "prefixkern_tensor_cores prefixkern_cuda_cores prefixkern_prefix_gemm prefixkern_triton_decode prefixkern_triton hf_dynamic_cache_sdpa "
                             "floor_no_prefix "
                             "peft_eager peft_sdpa prefixkern_raw_launch prefixkern_plain_launch prefixkern_liger floor_compiled peft_sdpa_compiled "
                             "prefixkern_compiled)")
    parser.add_argument("--quick", action="store_true", help="a few shapes per suite (a few minutes)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where results go (default benchmarks/results on a GPU, .bench_out/cpu-demo on a CPU)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--l2-flush", choices=L2_FLUSHES, default=None,
                        help="how the L2 is flushed before each timed call: read (the default, or "
                             "PREFIXKERN_BENCH_FLUSH: a sum over 256 MiB, which leaves no dirty line to be written "
                             "back during the call) or zero (triton.testing.do_bench's flush: 256 MiB zeroed)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="merge results files of one GPU (e.g. one per run_gpu.sh step) into one JSON, Markdown "
                             "table and plots in --out-dir, then exit")
    parser.add_argument("--targets", type=Path, default=None, metavar="JSON",
                        help="print the issues' speed and memory targets as a results file shows them, then exit")
    return parser


def known_case_names() -> set[str]:
    """Every name ``--shapes`` can pick in some suite on a GPU (attention, dropout and packed
    shapes, MLP shapes, training-step and generate() models, the decode grid)."""
    import itertools

    from . import attention, attention_dropout, attention_packed, decode, e2e, mlp

    grid = {f"P{p}-L{cache}-B{batch}" for p, cache, batch in itertools.product(decode.PREFIXES, decode.CACHES,
                                                                                 decode.BATCHES)}
    grid |= {f"{layout}-P{p}-L{cache}-B{batch}" for layout, _, _, _, p, cache, batch in decode.OTHER_HEADS}
    return (set(attention.SHAPES) | set(attention_dropout.SHAPES) | set(attention_packed.SHAPES) | set(mlp.SHAPES)
            | set(e2e.MODELS) | set(decode.GEN_MODELS) | grid)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for option, paths in (("--targets", [args.targets] if args.targets else []), ("--merge", args.merge or [])):
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            parser.error(f"{option}: no such results file: {', '.join(missing)}")
    # A misspelt case would otherwise be skipped without a word, and a GPU call spent on nothing.
    # (Only asked with --shapes: naming the cases imports every suite.)
    known = known_case_names() if args.shapes else set()
    unknown = sorted(set(args.shapes or ()) - known)
    if unknown:
        parser.error(f"--shapes: no suite has a case named {', '.join(unknown)} (known: {' '.join(sorted(known))})")
    if args.targets:
        import json

        from .targets import markdown as targets_markdown

        lines = targets_markdown(json.loads(args.targets.read_text()))
        print("\n".join(lines) if lines else f"{args.targets} holds no timed record (a CPU demo?): no target to judge")
        return 0
    if args.merge:
        from .common import merge_results

        paths = merge_results(args.merge, args.out_dir or Path("benchmarks/results"), plots=not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The kernels run in Triton's interpreter on CPU tensors (read when a kernel is defined,
        # so set before prefixkern's kernel modules are imported).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .. import use_backend
    from . import attention, common, decode, device, e2e, mlp
    from .common import CREATED_RECORDS, Options, print_table, results_stem, write_checkpoint, write_results

    suites = {"device": device, "attention": attention, "mlp": mlp, "e2e_train": e2e, "decode": decode}
    chosen = list(suites) if "all" in args.suite else list(dict.fromkeys(args.suite))
    if args.l2_flush:
        common.L2_FLUSH = args.l2_flush
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if on_gpu else "cpu")
    opts = Options(device=device, dtype=dtype, quick=args.quick, baselines=tuple(args.baselines or ()) or None,
                   shapes=tuple(args.shapes) if args.shapes else None, on_gpu=on_gpu)
    if not on_gpu:
        print("No GPU: running the CPU correctness demo (Triton kernels in the interpreter, tiny shapes).\n"
              "Speed figures need a GPU; none are reported here.\n")
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(chosen), unit="suite", file=sys.stderr)
    except ImportError:
        bar = None

    records, skips = [], []
    start = time.time()
    command = "prefixkern-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    first_record = len(CREATED_RECORDS)     # this run's records follow (a process may run several)
    out_dir = args.out_dir or (Path("benchmarks/results") if on_gpu else Path(".bench_out/cpu-demo"))
    stem = results_stem(out_dir, device)

    def timed_so_far() -> list:
        return [r for r in CREATED_RECORDS[first_record:] if r.ms is not None]

    def progress(message: str) -> None:
        # A row begins, so every row before it is complete: keep them on disk in case this
        # process is killed (the final write replaces the file).
        write_checkpoint(timed_so_far(), out_dir, device, command, stem)
        if bar is not None:
            bar.set_description(message[:60])
        else:
            print(f"  {message}", file=sys.stderr)

    write_checkpoint([], out_dir, device, command, stem)     # takes the name for this run
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    dumps_stacks = _dump_stacks_at_sigterm()
    try:
        # Every prefixkern row runs the Triton kernels, on the CPU demo too (interpreted).
        with use_backend("triton"):
            for name in chosen:
                got, skipped = suites[name].run(opts, progress)
                records += got
                skips += skipped
                if bar is not None:
                    bar.update(1)
    except _Stopped:
        # Stopped from outside (a time limit): keep every row timed so far, the current suite's too.
        records = timed_so_far()
        command += "  # stopped by SIGTERM before it finished: the rows timed until then"
        print(f"\nstopped by SIGTERM: writing the {len(records)} rows timed so far", file=sys.stderr)
    finally:
        if dumps_stacks:
            faulthandler.unregister(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous_handler)
    if bar is not None:
        bar.close()
    for skip in skips:
        print(f"skipped {skip.suite} / {skip.case} / {skip.impl}: {skip.reason}")
    # A suite runs or skips (saying why) every row asked for that it has: a name neither did is
    # one no suite run here has (misspelt, or another suite's).
    unheard = sorted(set(opts.baselines or ()) - {r.impl for r in records} - {s.impl for s in skips})
    if unheard:
        print(f"--baselines: no row named {', '.join(unheard)} in the suites run ({', '.join(chosen)})",
              file=sys.stderr)
    print_table(records, skips)
    paths = write_results(records, skips, out_dir, device, command, plots=not args.no_plots, stem=stem)
    print(f"\n{len(records)} records in {time.time() - start:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [r for r in records if r.impl == "prefixkern" and r.ok is False]
    if failed:
        print(f"FAILED correctness: {', '.join(f'{r.suite}/{r.case}/{r.pass_}' for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
