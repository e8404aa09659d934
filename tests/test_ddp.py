"""Data parallelism through torchrun-style process groups on CPU (gloo, 2 processes): DDP and
FSDP2 (``fully_shard``, per decoder layer and at the root). A patched model's prefix gradients
equal a single process's on the whole batch."""
import os
import sys

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


def _worker(rank, world, wrapper, init_file, out_file):
    from test_integration_hf import _batch, _pair

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_gloo_two_processes_match_single_process(tmp_path, wrapper):
    if wrapper == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    from test_integration_hf import _batch, _pair

    mp.spawn(_worker, args=(2, wrapper, str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=2, join=True)
    parallel_grads = torch.load(tmp_path / "grads.pt")
    _, model = _pair("llama")
    model.eval()
    ids, mask = _batch("none", batch=4)
    # Equal token counts per shard: the mean of the two shard losses' gradients is the full batch's.
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, param in model.prompt_encoder.named_parameters():
        torch.testing.assert_close(parallel_grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
