"""End-to-end suite: a bf16 training step (forward, loss, backward to the prefix) of models built
from real configs with random weights, for the floor (no prefix, SDPA's flash path, gradients
flowing to the input embeddings), stock PEFT with HF ``eager`` and ``sdpa``, and the patched model.
Causal LMs train on next-token loss; ``roberta-large`` is P-Tuning v2's setting, a two-label
sequence-classification head (``task_type="SEQ_CLS"``) on 32 sequences of 128 tokens.

A ragged case (``<model>-sft-ragged``: the seeds' SFT recipe, examples of 32-256 tokens) runs the
same examples right-padded (stock PEFT, the patched model) and packed into one row by
transformers' ``DataCollatorWithFlattening`` (the patched model: ``prefixkern_packed``); its
tokens/s counts real tokens only."""
from __future__ import annotations

import contextlib
import copy

import torch

from .attention_packed import ragged_lengths
from .common import (Options, Record, Skip, dtype_name, held, launch_path_skip, release_models, spread_note,
                     time_ms, with_raw_launch)
from .targets import INTERLEAVED_SUFFIX

P = 20


def model_config(name: str):
    import transformers as tf

    if name == "qwen2.5-0.5b":
        return tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                              rope_theta=1e6, tie_word_embeddings=True)
    if name == "bloomz-560m":
        return tf.BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)
    if name == "gpt2-medium":
        return tf.GPT2Config(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024)
    if name == "llama3.2-1b":
        return tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                              max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
    if name == "roberta-large":
        return tf.RobertaConfig(vocab_size=50265, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1,
                                pad_token_id=1, num_labels=2)
    if name == "cpu-tiny-llama":
        return tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    if name == "cpu-tiny-roberta":
        return tf.RobertaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, num_labels=2)
    raise ValueError(name)


# PEFT task type of each model (CAUSAL_LM unless named), and the transformers class it builds.
TASKS = {"roberta-large": "SEQ_CLS", "cpu-tiny-roberta": "SEQ_CLS"}


def task_of(name: str) -> str:
    return TASKS.get(name, "CAUSAL_LM")


def model_class(name: str):
    import transformers as tf

    return tf.AutoModelForSequenceClassification if task_of(name) == "SEQ_CLS" else tf.AutoModelForCausalLM


def labels_for(name: str, input_ids: torch.Tensor) -> torch.Tensor:
    """A step's labels: the tokens themselves (next-token loss), or one class per row."""
    if task_of(name) == "CAUSAL_LM":
        return input_ids
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 2, (input_ids.shape[0],), generator=gen).to(input_ids.device)


MODELS = ("qwen2.5-0.5b", "bloomz-560m", "gpt2-medium", "llama3.2-1b", "roberta-large")
QUICK = ("qwen2.5-0.5b",)
LENGTHS = {256: 8, 2048: 2}     # S -> batch
MODEL_LENGTHS = {"roberta-large": {128: 32}}    # P-Tuning v2's NLU batches (RoBERTa has 512 positions)
IMPLS = ("floor_no_prefix", "peft_eager", "peft_sdpa", "prefixkern", "prefixkern_raw_launch", "prefixkern_liger")
# The same steps under torch.compile with CUDA graphs ("reduce-overhead"), which takes away the
# per-launch host time that bounds the eager steps at these sizes. GPU only, and left out of
# --quick unless --baselines names them (compiling takes minutes). Stock PEFT lists no prompt
# learning method as compile-ready: its row says whether it compiles. Ours before stock PEFT's:
# issue 4 reads the patched row against the floor's, and in the sixth H200 run (inductor compiling
# in process) stock PEFT's row was still compiling after 2.5 minutes when the call's limit came.
COMPILED_IMPLS = ("floor_compiled", "prefixkern_compiled", "peft_sdpa_compiled")
COMPILE_MODE = "reduce-overhead"


def _apply_to_instance_only(apply, model) -> None:
    """Liger-Kernel's ``apply_liger_kernel_to_<type>(model=...)`` patches the instance *and* replaces
    classes and functions in the transformers modeling module (``LlamaRMSNorm``, ``LlamaMLP``, ...),
    so every model built after it in this process, the baselines included, would run Liger's
    kernels too. Put the module back; the instance keeps its patched modules."""
    import sys

    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    apply(model=model, rope=False)
    for attr in set(vars(module)) - set(saved):
        delattr(module, attr)
    for attr, value in saved.items():
        if getattr(module, attr, None) is not value:
            setattr(module, attr, value)


def build_model(name: str, impl: str, opts: Options, base_state, num_virtual_tokens: int = P):
    """The model a row of the suite runs: the frozen base (floor), stock PEFT on ``eager`` or
    ``sdpa``, or the patched model (optionally with Liger-Kernel's patch), same weights."""
    from peft import PrefixTuningConfig, get_peft_model

    attn = "eager" if impl == "peft_eager" or impl.startswith("prefixkern") else "sdpa"
    config = copy.deepcopy(model_config(name))
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(opts.device):      # initialise on the GPU: CPU init of a 1B model takes seconds
        model = model_class(name).from_config(config, attn_implementation=attn, torch_dtype=opts.dtype)
    model.load_state_dict(base_state)
    if impl == "prefixkern_liger":
        import liger_kernel.transformers as liger

        apply = getattr(liger, f"apply_liger_kernel_to_{config.model_type}", None)
        if apply is None:
            raise RuntimeError(f"Liger-Kernel has no patch for {config.model_type}")
        _apply_to_instance_only(apply, model)
    if impl == "floor_no_prefix":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    torch.manual_seed(1)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=task_of(name), num_virtual_tokens=num_virtual_tokens,
                                                          prefix_projection=True))
    peft_model.to(opts.device)
    if impl.startswith("prefixkern"):
        import prefixkern

        prefixkern.patch(peft_model)
    return peft_model


def _step_fn(model, impl: str, input_ids, attention_mask, labels):
    if impl == "prefixkern_raw_launch":
        return with_raw_launch(_step_fn(model, "prefixkern", input_ids, attention_mask, labels))

    def step():
        model.zero_grad(set_to_none=True)
        if impl == "floor_no_prefix":
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
            out = model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        return out.loss.detach()
    return step


def interleaved_times(steps: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Each of ``steps`` (name -> step) timed in ``rounds`` rounds that take the steps in turn,
    ``calls`` calls of each per round, every call between two synchronisations (wall clock, the
    host's time included): ``{name: [ms of each call]}``. Drift of a shared GPU host over the
    rounds reaches every step alike."""
    import time

    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(calls):
                torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _raw_launch_row() -> str:
    """The row that launches raw and carries the interleaved raw/plain note: ``prefixkern`` where
    the raw launch is the default (``prefixkern_raw_launch`` is then skipped as the same row)."""
    from ..kernels._launch import RAW_POINTERS

    return "prefixkern" if RAW_POINTERS else "prefixkern_raw_launch"


def interleaved_note(plain, raw, unplanned=None, rounds: int = 6, calls: int = 3) -> str:
    """The plain and the raw-pointer launch (and, given ``unplanned``, the plain launch without
    launch plans) timed in alternating rounds on the same model (``interleaved_times``): the
    raw-launch and launch-plan decisions read this beside the rows' own medians."""
    import statistics

    steps = {"plain": plain, "raw": raw}
    if unplanned is not None:
        steps["unplanned"] = unplanned
    times = interleaved_times(steps, rounds, calls)
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    unplanned_part = (f", plain without launch plans {medians['unplanned']:.3g} ms (plain/unplanned "
                      f"{medians['plain'] / medians['unplanned']:.3f})" if unplanned is not None else "")
    return (f"interleaved with the plain launch on this model ({rounds} rounds of {calls} steps each): "
            f"raw {medians['raw']:.3g} ms, plain {medians['plain']:.3g} ms{unplanned_part} (medians; raw/plain "
            f"{medians['raw'] / medians['plain']:.3f})")


# The floor, stock PEFT + sdpa and the patched model timed again side by side, as the case
# "<case>-interleaved": their models alive together, taking turns (``interleaved_times``). The rows
# above are timed one after another, minutes apart, and a host-bound step's time drifts over a run
# on a shared GPU host (the H200 runs' rows rose with their order: the floor, timed first, read
# 48.8-70.9 ms across three runs), so the floor ratio is read here too.
INTERLEAVED_IMPLS = ("floor_no_prefix", "peft_sdpa", "prefixkern")
INTERLEAVED_ROUNDS, INTERLEAVED_CALLS = 6, 3


def _interleaved_case(opts: Options, progress, name: str, case: str, base_state, inputs, rows: dict[str, Record],
                      tokens: int) -> tuple[list[Record], list[Skip]]:
    """Records of case ``<case>-interleaved``: ``INTERLEAVED_IMPLS`` whose row of ``case`` was timed
    (``rows``), timed again side by side; each keeps its row's loss check. Nothing without the
    patched row and the floor's."""
    import statistics

    impls = [impl for impl in INTERLEAVED_IMPLS if impl in rows and rows[impl].ms]
    if "prefixkern" not in impls or "floor_no_prefix" not in impls:
        return [], []
    interleaved_case = case + INTERLEAVED_SUFFIX
    progress(f"e2e_train {interleaved_case} {' '.join(impls)}")
    steps = {}
    try:
        for impl in impls:
            steps[impl] = _step_fn(build_model(name, impl, opts, base_state), impl, *inputs)
            steps[impl]()                      # warm: allocator pools, the first step's one-time work
        times = interleaved_times(steps, INTERLEAVED_ROUNDS, INTERLEAVED_CALLS)
    except Exception as exc:                   # out of memory with three models, say: the rows above stand
        return [], [Skip("e2e_train", interleaved_case, "all", f"{type(exc).__name__}: {str(exc)[:300]}")]
    finally:
        steps.clear()
        release_models(opts.on_gpu)
    records = []
    for impl in impls:
        row = rows[impl]
        ms = statistics.median(times[impl])
        record = Record("e2e_train", interleaved_case, impl, "step", row.dtype, ms=ms,
                        tokens_per_s=tokens / (ms * 1e-3), max_err=row.max_err, ok=row.ok)
        others = ", ".join(i for i in impls if i != impl)
        record.note = (f"timed side by side with {others}: {INTERLEAVED_ROUNDS} rounds, each {INTERLEAVED_CALLS} "
                       f"synchronised steps of every model in turn (wall clock); {spread_note(times[impl])}")
        records.append(record)
    return records, []


def _compiled_step(step):
    """A step of a CUDA-graphed model: each call starts a new step for cudagraph trees (the
    previous step's outputs, read already, may be overwritten)."""
    def compiled_step():
        torch.compiler.cudagraph_mark_step_begin()
        return step()
    return compiled_step


def _eager_impl(impl: str) -> str:
    """The eager row a compiled row compiles (``prefixkern_compiled`` -> ``prefixkern``)."""
    base = impl.removesuffix("_compiled")
    return "floor_no_prefix" if base == "floor" else base


def has_dropout(model) -> bool:
    """Whether a training step of ``model`` drops anything: an ``nn.Dropout`` with p > 0, or an
    attention dropout probability that HF attention modules keep as a float (``attention_dropout``,
    ``dropout``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0.0:
            return True
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0.0:
                return True
    return False


@contextlib.contextmanager
def dropout_off(model):
    """Evaluation mode for the call that records the checked loss of a model with dropout (none
    otherwise: a compiled model would compile again for the other mode). The rows draw their
    dropout masks differently (stock PEFT's attention through torch's generator, the patched one
    from Philox in the kernel), so only dropout-free losses compare; the timed steps train."""
    if model is None or not model.training or not has_dropout(model):
        yield False
        return
    model.eval()
    try:
        yield True
    finally:
        model.train()


def measure_step(opts: Options, record: Record, step, tokens: int, losses: dict, check: bool, model=None) -> Record:
    """Time a training step and its peak memory, record its loss in ``losses`` and, with ``check``,
    compare it with stock PEFT eager's (``losses["peft_eager"]``, measured first). ``model``: the
    step's model, whose recorded loss is taken with dropout off (``dropout_off``)."""
    try:
        with dropout_off(model) as off:
            losses[record.impl] = step().float().item()
        if off:
            record.add_note("loss checked with dropout off, steps timed with it on")
        samples: list[float] = []
        record.ms = time_ms(step, on_gpu=opts.on_gpu, quick=True, samples=samples)
        if samples:           # host-bound steps: the spread decides whether two rows differ
            record.add_note(spread_note(samples))
        if opts.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            record.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
        if record.ms:
            record.tokens_per_s = tokens / (record.ms * 1e-3)
    except torch.cuda.OutOfMemoryError:
        record.note = "out of memory"
        torch.cuda.empty_cache()
    ref = losses.get("peft_eager")
    if check and ref is not None and record.impl in losses:
        record.max_err = abs(losses[record.impl] - ref) / max(1.0, abs(ref))
        record.ok = bool(record.max_err <= {torch.float32: 1e-4, torch.float16: 5e-3,
                                            torch.bfloat16: 2e-2}[opts.dtype])
    record.add_note(f"loss {losses.get(record.impl, float('nan')):.5f}")
    return record


# Stock PEFT 0.21's error for its task heads on transformers 5.24 (see stock_task_loss).
_STOCK_TASK_ERROR = "does not support past key values"


def stock_task_loss(model, input_ids, attention_mask, labels) -> float:
    """Stock PEFT's loss for a task head where its forward raises: PEFT 0.21 looks for
    ``past_key_values`` in the head's signature, which transformers 5.24 renamed ``cache``. What it
    computes on older releases: the task model with the prefix's mask columns and PEFT's prompt
    cache (no gradients: the reference of the patched row's loss check)."""
    from ..integrations.hf import _task_cache_argument

    batch = input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, model.active_peft_config.num_virtual_tokens), attention_mask], 1)
    cache = {_task_cache_argument(model): model.get_prompt(batch)}
    with torch.no_grad(), dropout_off(model):
        out = model.base_model(input_ids=input_ids, attention_mask=mask, labels=labels, **cache)
    return out.loss.float().item()


RAGGED_IMPLS = ("peft_eager", "peft_sdpa", "prefixkern", "prefixkern_packed")


def ragged_batches(lengths, vocab_size: int, device):
    """The same examples right-padded (``input_ids``, ``attention_mask``, ``labels`` with -100 at
    padding) and packed by ``DataCollatorWithFlattening`` (one row, ``cu_seq_lens_q/k``)."""
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, vocab_size, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(examples), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = example
        mask[row, : len(example)] = 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": e.tolist()} for e in examples])
    move = lambda batch: {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    return move(padded), move(packed)


def _ragged_case(opts: Options, progress, name: str, config, base_state, lengths) -> tuple[list[Record], list[Skip]]:
    records, skips = [], []
    case = f"{name}-sft-ragged"
    padded, packed = ragged_batches(lengths, config.vocab_size, opts.device)
    losses = {}
    for impl in RAGGED_IMPLS:
        if not opts.wants(impl):
            continue
        progress(f"e2e_train {case} {impl}")
        record = Record("e2e_train", case, impl, "step", dtype_name(opts.dtype))
        model = build_model(name, "prefixkern" if impl == "prefixkern_packed" else impl, opts, base_state)
        inputs = packed if impl == "prefixkern_packed" else padded

        def step(model=model, inputs=inputs):
            model.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
            return loss.detach()

        failed = None
        try:
            records.append(measure_step(opts, record, step, sum(lengths), losses, check=True, model=model))
        except Exception as exc:   # ours: a failed row; a baseline: a skip with its reason
            failed = f"step failed: {type(exc).__name__}: {str(exc)[:300]}"
        if failed is not None and impl.startswith("prefixkern"):
            record.ok, record.note = False, failed
            records.append(record)
        elif failed is not None:
            skips.append(Skip("e2e_train", case, impl, failed))
        del model, step
        release_models(opts.on_gpu)
    return records, skips


# The seeds' SFT recipe: 16 examples of 32-256 tokens (the attention suite's packed-qwen lengths).
RAGGED_LENGTHS = {"qwen2.5-0.5b": ragged_lengths(16, 32, 256, 0), "llama3.2-1b": ragged_lengths(16, 32, 256, 0),
                  "cpu-tiny-llama": (5, 9, 3)}


def _compiled_row_skipped(opts: Options) -> str | None:
    """Why a torch.compile row does not run here, or None."""
    if not opts.on_gpu:
        return "the torch.compile rows run on a GPU (CUDA graphs)"
    if opts.quick and not (opts.baselines and any(impl in opts.baselines for impl in COMPILED_IMPLS)):
        return "--quick leaves the torch.compile rows out (minutes of compiling): name them with --baselines"
    return None


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    records, skips = [], []
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:
        return records, [Skip("e2e_train", "all", "all", f"transformers/peft unavailable ({exc})")]
    if opts.on_gpu:
        models = opts.shapes or (QUICK if opts.quick else MODELS)
        default_lengths = {256: 8} if opts.quick else LENGTHS
    else:
        models, default_lengths = ("cpu-tiny-llama", "cpu-tiny-roberta"), {16: 2}
    for name in models:
        try:
            config = model_config(name)
        except ValueError:
            continue
        torch.manual_seed(0)
        with torch.device(opts.device):
            base_state = model_class(name).from_config(config, torch_dtype=opts.dtype).state_dict()
        lengths = MODEL_LENGTHS.get(name, default_lengths) if opts.on_gpu else default_lengths
        for seq_len, batch in lengths.items():
            case = f"{name}-S{seq_len}"
            limit = getattr(config, "n_positions", None)
            gen = torch.Generator().manual_seed(0)
            # (from 3: clear of RoBERTa's padding and special tokens, so every position is a real token)
            input_ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=gen).to(opts.device)
            attention_mask = torch.ones_like(input_ids)
            labels = labels_for(name, input_ids)
            losses = {}
            for impl in IMPLS + COMPILED_IMPLS:
                if not opts.wants(impl):
                    continue
                if impl in COMPILED_IMPLS:
                    reason = _compiled_row_skipped(opts)
                    if reason:
                        skips.append(Skip("e2e_train", case, impl, reason))
                        continue
                if limit is not None and seq_len + P > limit:
                    skips.append(Skip("e2e_train", case, impl, f"GPT-2 has {limit} positions; P + S = {P + seq_len}"))
                    continue
                if impl == "prefixkern_raw_launch" and (reason := launch_path_skip(opts, impl)):
                    skips.append(Skip("e2e_train", case, impl, reason))
                    continue
                if impl == "prefixkern_liger":
                    try:
                        import liger_kernel  # noqa: F401
                    except Exception as exc:
                        skips.append(Skip("e2e_train", case, impl, f"liger-kernel not installed ({type(exc).__name__})"))
                        continue
                    if not opts.on_gpu:   # its kernels assume a GPU (they fail in Triton's interpreter)
                        skips.append(Skip("e2e_train", case, impl, "Liger-Kernel's kernels need a GPU"))
                        continue
                progress(f"e2e_train {case} {impl}")
                record = Record("e2e_train", case, impl, "step", dtype_name(opts.dtype))
                eager = _eager_impl(impl)
                try:
                    model = build_model(name, eager, opts, base_state)
                except Exception as exc:
                    skips.append(Skip("e2e_train", case, impl, f"could not build: {type(exc).__name__}: {exc}"))
                    continue
                failed = None
                if impl in COMPILED_IMPLS:
                    record.note = f"torch.compile(mode={COMPILE_MODE!r}), CUDA graphs' own memory pool included; "
                    step = _compiled_step(_step_fn(torch.compile(model, mode=COMPILE_MODE), eager, input_ids,
                                                   attention_mask, labels))
                    try:
                        step()                      # compiles, and records the graphs
                    except Exception as exc:        # stock PEFT's prompt learning may not compile
                        failed = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
                else:
                    step = _step_fn(model, impl, input_ids, attention_mask, labels)
                if failed is None:
                    try:
                        records.append(measure_step(opts, record, step, batch * seq_len, losses,
                                                    check=eager != "floor_no_prefix", model=model))
                        if impl == _raw_launch_row() and opts.on_gpu and record.ms:
                            from ..kernels._launch import launch_plans

                            patched = _step_fn(model, "prefixkern", input_ids, attention_mask, labels)
                            plain = with_raw_launch(patched, enabled=False)
                            unplanned = held(plain, lambda: launch_plans(False))
                            record.add_note(interleaved_note(plain, with_raw_launch(patched), unplanned))
                    except Exception as exc:   # a baseline that cannot: stock PEFT's task heads on transformers 5.24
                        # Ours failing is a result too: a failed row (below), and the suite goes on,
                        # so a GPU session does not lose the rows after it.
                        failed = f"step failed: {type(exc).__name__}: {str(exc)[:300]}"
                        if impl == "peft_eager" and _STOCK_TASK_ERROR in str(exc):
                            losses["peft_eager"] = stock_task_loss(model, input_ids, attention_mask, labels)
                            failed += " (the check's reference: the loss it computes on older transformers)"
                # (Outside the handlers: their tracebacks no longer hold the model.)
                if failed is not None and impl.startswith("prefixkern"):
                    record.ok, record.note = False, (record.note or "") + failed
                    records.append(record)
                elif failed is not None:
                    skips.append(Skip("e2e_train", case, impl, failed))
                del model, step
                if impl in COMPILED_IMPLS:
                    torch._dynamo.reset()           # the next compiled row compiles its own model
                release_models(opts.on_gpu)
            if opts.on_gpu:
                rows = {r.impl: r for r in records if r.case == case}
                got, skipped = _interleaved_case(opts, progress, name, case, base_state,
                                                 (input_ids, attention_mask, labels), rows, batch * seq_len)
                records += got
                skips += skipped
        if name in RAGGED_LENGTHS:
            got, skipped = _ragged_case(opts, progress, name, config, base_state, RAGGED_LENGTHS[name])
            records += got
            skips += skipped
    return records, skips
