"""The issues' speed and memory targets, read off a results file: what each asks, the figure the
file holds for it, and whether it is met. ``markdown_table`` appends them to every results table;
``prefixkern-bench --targets FILE.json`` prints them.

A target with no record to judge it by (a suite or shape the run skipped, a device probe missing)
is listed as "no data", never as met.
"""
from __future__ import annotations

import dataclasses
import re

# The e2e suite's cases timed again with the floor and stock PEFT side by side (prefixkern/bench/e2e.py,
# ``_interleaved_case``): issue 4's ratios are read off them as off the case itself.
INTERLEAVED_SUFFIX = "-interleaved"

# Cases the issues name.
ATTENTION_CASES = ("llama8b-2k", "llama8b-8k", "long-32k")
MLP_CASES = ("qwen2.5-0.5b", "bloomz-560m", "llama3-8b")
# The decode rows read against issue 6: the default kernel's, and each other CUDA kernel's where the
# file has it (the suite times the one the default does not run), labelled.
DECODE_KERNEL_LABELS = {"prefixkern": "", "prefixkern_tensor_cores": " (tensor cores)",
                        "prefixkern_cuda_cores": " (CUDA cores)", "prefixkern_one_stage": " (one-stage tensor cores)",
                        "prefixkern_two_stage": " (two-stage tensor cores)"}


@dataclasses.dataclass
class Target:
    issue: int
    what: str          # the target, in the issue's words
    case: str
    value: str         # the figure the file holds ("-" with no data)
    met: bool | None   # None: no data
    ceiling: float | None = None    # the most any kernel could reach on this figure, where the file bounds it


def _index(records: list[dict]) -> dict[tuple, dict]:
    return {(r["suite"], r["case"], r["impl"], r["pass"]): r for r in records}


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}"


def _meets(value: float | None, bound: float) -> bool | None:
    """``value >= bound``, or None (no data) without a value."""
    return None if value is None else value >= bound


def _share(value: float | None, probe: float | None, unit: str) -> tuple[float | None, str]:
    """``value`` as a fraction of a device probe, and how the table shows it."""
    share = value / probe if value and probe else None
    return share, f"{_fmt(share * 100 if share else None, '%')} ({_fmt(value)} of {_fmt(probe)} {unit})"


# The device probes a bandwidth target is a share of: the higher of the copy rate and the read rate
# (a read-only call's ceiling; the six runs' files to 2026-11-27 hold the copy probe alone).
BANDWIDTH_PROBES = ("copy-", "read-512MiB")


def _probe(records: list[dict], case_prefix: str | tuple[str, ...], field: str) -> float | None:
    values = [r[field] for r in records if r["suite"] == "device" and r["case"].startswith(case_prefix) and r[field]]
    return max(values) if values else None


_OTHER_FLUSH_NOTE = re.compile(r"after a (\w+) flush \([^)]*\): [^,]+ ms, ([0-9.e+]+) GB/s")


def _bandwidth_share(record: dict | None, probe: float | None) -> tuple[float | None, str]:
    """``record``'s GB/s as a share of ``probe`` (``_share``), and in the text also the share it read
    after the other L2 flush where its note says (the bench notes it on memory-bound rows)."""
    share, text = _share(record["gbps"] if record else None, probe, "GB/s")
    found = _OTHER_FLUSH_NOTE.search((record or {}).get("note") or "")
    if found and probe:
        text += f"; {float(found.group(2)) / probe * 100:.3g}% after a {found.group(1)} flush"
    return share, text


def _ratio(records, idx, suite, case, pass_, baselines, impl: str = "prefixkern") -> tuple[float | None, str]:
    """(fastest baseline's ms / ``impl``'s ms, that baseline's name) over ``baselines``
    (None: every non-prefixkern row of the case)."""
    ours = idx.get((suite, case, impl, pass_))
    if not ours or not ours["ms"]:
        return None, ""
    rows = [r for r in records if r["suite"] == suite and r["case"] == case and r["pass"] == pass_ and r["ms"]
            and not r["impl"].startswith("prefixkern") and (baselines is None or r["impl"] in baselines)]
    if not rows:
        return None, ""
    best = min(rows, key=lambda r: r["ms"])
    return best["ms"] / ours["ms"], best["impl"]


def _decode_ceiling(sdpa: dict | None, probe: float | None) -> float | None:
    """The most any decode kernel could gain over SDPA on the concatenated cache at this point: SDPA's
    time over the time to read the bytes a batch-shared prefix leaves to read (the cache once, the
    prefix once) at the device probe's rate. Every decode row's GB/s counts those bytes, SDPA's too,
    so this is ``probe / SDPA's GB/s``. Below 2 where SDPA already reads near the probe's rate: there
    issue 6's "2x faster than SDPA" is out of any kernel's reach (the bytes SDPA reads beyond ours, B
    copies of the prefix, are (B - 1) * P of B * (P + L) keys). Far above 2 at small caches, where
    both are bound by latency, not bandwidth: an upper bound, not a promise."""
    if not sdpa or not sdpa.get("gbps") or not probe:
        return None
    return probe / sdpa["gbps"]


def evaluate(payload: dict) -> list[Target]:
    records = payload["records"]
    idx = _index(records)
    matmul_tflops = _probe(records, "matmul", "tflops")
    bandwidth_gbps = _probe(records, BANDWIDTH_PROBES, "gbps")
    out: list[Target] = []

    def add(issue, what, case, value, met, ceiling=None):
        out.append(Target(issue, what, case, value, met, ceiling))

    # ---- issue 2: prefix_attention ----
    for case in ATTENTION_CASES:
        ratio, name = _ratio(records, idx, "attention", case, "fwd_bwd", None)
        add(2, "fwd+bwd at least as fast as the fastest baseline", case,
            f"{_fmt(ratio, 'x')} vs {name}" if ratio else "-", _meets(ratio, 1.0))
        ratio, _ = _ratio(records, idx, "attention", case, "fwd_bwd", ("sdpa_mask",))
        add(2, "fwd+bwd 2x faster than HF sdpa with a PEFT prefix (sdpa_mask)", case, _fmt(ratio, "x"),
            _meets(ratio, 2.0))
        ours = idx.get(("attention", case, "prefixkern", "fwd_bwd"))
        others = [r["peak_mem_mb"] for r in records if r["suite"] == "attention" and r["case"] == case
                  and r["pass"] == "fwd_bwd" and not r["impl"].startswith("prefixkern") and r["peak_mem_mb"]]
        mem = ours["peak_mem_mb"] if ours else None
        add(2, "fwd+bwd peak memory below every baseline's", case,
            f"{_fmt(mem, ' MiB')} vs min {_fmt(min(others) if others else None, ' MiB')}",
            None if mem is None or not others else mem < min(others))
    fwd = idx.get(("attention", "llama8b-8k", "prefixkern", "fwd"))
    share, text = _share(fwd["tflops"] if fwd else None, matmul_tflops, "TFLOP/s")
    add(2, "fwd at 55% or more of the GPU's measured bf16 matmul TFLOP/s", "llama8b-8k", text, _meets(share, 0.55))

    # ---- issue 3: fused prefix MLP (the model shapes, and their +autocast / +tf32 variants) ----
    mlp_cases = [c for c in dict.fromkeys(r["case"] for r in records if r["suite"] == "mlp")
                 if c.split("+")[0] in MLP_CASES]
    for case in mlp_cases:
        # The other float32 products beside the default where the run timed them: runs before
        # 2026-11-26 16:00 defaulted to FMA products and timed 3xTF32 as prefixkern_tf32x3; later
        # ones default to 3xTF32 and time FMA products as prefixkern_fma.
        for impl, label in (("prefixkern", case), ("prefixkern_tf32x3", f"{case} (3xTF32)"),
                            ("prefixkern_fma", f"{case} (FMA float32)")):
            if impl != "prefixkern" and not any(idx.get(("mlp", case, impl, p)) for p in ("fwd", "fwd_bwd")):
                continue
            for pass_ in ("fwd", "fwd_bwd"):
                ratio, _ = _ratio(records, idx, "mlp", case, pass_, ("torch_p_rows",), impl=impl)
                add(3, f"{pass_} 1.2x faster than the same math in PyTorch on P rows", label, _fmt(ratio, "x"),
                    _meets(ratio, 1.2))
            ours = idx.get(("mlp", case, impl, "fwd"))
            share, text = _bandwidth_share(ours, bandwidth_gbps)
            add(3, "reads W2 at 70% or more of the GPU's measured bandwidth (fwd)", label, text, _meets(share, 0.7))

    # ---- issue 4: the patched model end to end ----
    for r in records:
        if r["suite"] != "e2e_train" or r["impl"] != "prefixkern_compiled" or not r["ms"]:
            continue
        # The same comparison with both steps under torch.compile (CUDA graphs), where the per-launch
        # host time that bounds the eager steps at the seeds' sizes is gone: judged beside the eager
        # one, not in its place.
        floor = idx.get(("e2e_train", r["case"], "floor_compiled", "step"))
        if floor and floor["ms"]:
            add(4, "step within 5% of the floor's time (both compiled)", r["case"],
                _fmt(r["ms"] / floor["ms"], "x compiled floor"), r["ms"] <= 1.05 * floor["ms"])
    for r in records:
        if r["suite"] != "e2e_train" or r["impl"] != "prefixkern" or not r["ms"]:
            continue
        case = r["case"]
        floor = idx.get(("e2e_train", case, "floor_no_prefix", "step"))
        if floor and floor["ms"]:
            add(4, "step within 5% of the floor's time", case, _fmt(r["ms"] / floor["ms"], "x floor"),
                r["ms"] <= 1.05 * floor["ms"])
            if r["peak_mem_mb"] and floor["peak_mem_mb"]:
                add(4, "peak memory within 2% of the floor's", case,
                    _fmt(r["peak_mem_mb"] / floor["peak_mem_mb"], "x floor"),
                    r["peak_mem_mb"] <= 1.02 * floor["peak_mem_mb"])
        sdpa = idx.get(("e2e_train", case, "peft_sdpa", "step"))
        if "S2048" in case and sdpa and sdpa["ms"]:
            add(4, "1.2x stock PEFT + sdpa tokens/s at S=2048", case, _fmt(sdpa["ms"] / r["ms"], "x"),
                sdpa["ms"] / r["ms"] >= 1.2)
        if not case.endswith(INTERLEAVED_SUFFIX):      # (the same loss as its case's row)
            add(4, "same loss as stock PEFT on the same batch", case, _fmt(r["max_err"]), r["ok"])

    # ---- issue 6: decode (the default kernel, and the other CUDA kernel where the file has it) ----
    for r in records:
        if r["suite"] != "decode" or r["impl"] not in DECODE_KERNEL_LABELS or not r["ms"]:
            continue
        case = r["case"] + DECODE_KERNEL_LABELS[r["impl"]]
        if r["pass"] == "generate":
            ratio, _ = _ratio(records, idx, "decode", r["case"], "generate", ("peft_sdpa",), impl=r["impl"])
            text = _fmt(ratio, "x")
            dynamic_case = r["case"].removesuffix("-static")
            if ratio is None and dynamic_case != r["case"]:
                # Stock PEFT's static request failed (the suite lists why under "skipped": a KeyError
                # on transformers 5.17): what a user of it gets is its dynamic cache.
                stock = idx.get(("decode", dynamic_case, "peft_sdpa", "generate"))
                if stock and stock["ms"]:
                    ratio = stock["ms"] / r["ms"]
                    text = _fmt(ratio, "x vs stock PEFT's dynamic cache (its static request failed)")
            add(6, "generate() never slower than stock PEFT + sdpa", case, text, _meets(ratio, 1.0))
            continue
        if r["pass"] == "step":
            # "What HF does today", read per step: its DynamicCache append (torch.cat of the whole
            # cache) and SDPA, against the in-place append and the decode kernel.
            ratio, _ = _ratio(records, idx, "decode", r["case"], "step", ("hf_dynamic_cache_sdpa",), impl=r["impl"])
            add(6, "a decoding step (cache append + attention) 2x faster than HF's DynamicCache + SDPA", case,
                _fmt(ratio, "x"), _meets(ratio, 2.0))
            continue
        share, text = _bandwidth_share(r, bandwidth_gbps)
        add(6, "reads KV at 70% or more of the GPU's measured bandwidth", case, text, _meets(share, 0.7))
        ratio, _ = _ratio(records, idx, "decode", r["case"], "fwd", ("sdpa_concat",), impl=r["impl"])
        ceiling = (_decode_ceiling(idx.get(("decode", r["case"], "sdpa_concat", "fwd")), bandwidth_gbps)
                   if ratio is not None else None)
        text = _fmt(ratio, "x") + (f" (ceiling {_fmt(ceiling, 'x')})" if ceiling else "")
        add(6, "2x faster than SDPA on the concatenated cache", case, text, _meets(ratio, 2.0), ceiling)
        # The Triton decode path: the faster of the Triton decode kernel and the general forward kernel.
        tritons = [idx.get(("decode", r["case"], impl, "fwd")) for impl in ("prefixkern_triton_decode",
                                                                            "prefixkern_triton")]
        tritons = [t for t in tritons if t and t["ms"]]
        if tritons:
            triton = min(tritons, key=lambda t: t["ms"])
            add(6, "faster than the Triton decode path", case, _fmt(triton["ms"] / r["ms"], f"x vs {triton['impl']}"),
                r["ms"] < triton["ms"])
    return out


def markdown(payload: dict) -> list[str]:
    """The targets as Markdown lines (empty when the file holds no timed record)."""
    if not any(r["ms"] for r in payload["records"]):
        return []
    targets = evaluate(payload)
    met = sum(t.met is True for t in targets)
    missed = sum(t.met is False for t in targets)
    lines = ["## the issues' targets", "",
             f"{met} met, {missed} not met, {len(targets) - met - missed} without data in this file "
             "(relative targets use this file's device probes: `--suite device`).", "",
             "| issue | target | case | figure | met |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        verdict = "no data" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.issue} | {t.what} | {t.case} | {t.value} | {verdict} |")
    bounded = [t for t in targets if t.ceiling is not None]
    if bounded:
        below = sum(t.ceiling < 2.0 for t in bounded)
        lines += ["", f"A ceiling in brackets is the most any kernel could gain over SDPA at that point: SDPA's "
                  "time over the time to read the bytes left to read (the cache once, the prefix once) at the "
                  f"device probe's rate. It is below the 2x asked at {below} of {len(bounded)} decode rows: "
                  "there SDPA already reads near that rate. Large ceilings mark latency-bound points."]
    return lines + [""]
