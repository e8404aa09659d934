"""Data parallelism through torchrun-style process groups on CPU (gloo, 2 processes): DDP and
FSDP2 (``fully_shard``, per decoder layer and at the root). A patched model's prefix gradients
equal a single process's on the whole batch."""
import gc
import os
import socket
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")
sys.path.insert(0, os.path.dirname(__file__))


def _wrap(model, wrapper: str, world: int):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


# The whole test's budget. A gloo group that cannot connect (a host name resolving to an address that
# drops packets) otherwise waits gloo's default 30 minutes per collective: CI once hung here.
_DEADLINE_S = 300


def _loopback_interface():
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _worker(rank, world, wrapper, init_file, out_file, joined_dir):
    from test_integration_hf import _batch, _pair

    # Both processes live on this machine: keep gloo off interfaces the host name may point at.
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        dist.barrier()
        open(os.path.join(joined_dir, str(rank)), "w").close()
        _, model = _pair("llama")
        model.eval()   # no dropout: the two runs must see the same function
        wrapped = _wrap(model, wrapper, world)
        ids, mask = _batch("none", batch=4)
        shard = slice(rank * 2, rank * 2 + 2)
        wrapped(input_ids=ids[shard], attention_mask=mask[shard], labels=ids[shard]).loss.backward()
        # FSDP2 leaves each rank a shard of the gradient (a DTensor): gather it on every rank.
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in model.prompt_encoder.named_parameters()}
        if rank == 0:
            torch.save(grads, out_file)
        # Free the wrapper (DDP's reducer, FSDP's hooks) while its process group still exists:
        # freed after destroy_process_group, it now and then aborted or hung the process.
        del wrapped, model, grads
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_with_deadline(wrapper, tmp_path, world=2):
    """Run the workers; fail (not hang) past ``_DEADLINE_S``, and skip only when the machine could not
    form the process group at all (no group, nothing of ours was tested)."""
    joined = tmp_path / "joined"
    joined.mkdir()
    args = (world, wrapper, str(tmp_path / "init"), str(tmp_path / "grads.pt"), str(joined))
    context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + _DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} gloo workers did not finish in {_DEADLINE_S} s")
    except Exception as error:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        if len(os.listdir(joined)) < world:
            pytest.skip(f"this machine could not form a {world}-process gloo group: {error}")
        raise


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_gloo_two_processes_match_single_process(tmp_path, wrapper):
    if wrapper == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
        if torch.__version__ < (2, 10):
            # torch 2.8's FSDP2 over gloo gave twice the single process's gradients, for stock PEFT
            # as for the patched model (2.10 and later average; 2.9 was not checked).
            pytest.skip(f"FSDP2 over gloo sums the ranks' gradients on torch {torch.__version__}")
    from test_integration_hf import _batch, _pair

    _spawn_with_deadline(wrapper, tmp_path)
    parallel_grads = torch.load(tmp_path / "grads.pt")
    _, model = _pair("llama")
    model.eval()
    ids, mask = _batch("none", batch=4)
    # Equal token counts per shard: the mean of the two shard losses' gradients is the full batch's.
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, param in model.prompt_encoder.named_parameters():
        torch.testing.assert_close(parallel_grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
