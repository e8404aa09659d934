"""DDP through torchrun-style process groups on CPU (gloo, 2 processes): a patched model's prefix
gradients equal a single process's on the whole batch."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft")
sys.path.insert(0, os.path.dirname(__file__))


def _worker(rank, world, init_file, out_file):
    from test_integration_hf import _batch, _pair

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, model = _pair("llama")
        model.eval()   # no dropout: the two runs must see the same function
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, mask = _batch("none", batch=4)
        shard = slice(rank * 2, rank * 2 + 2)
        ddp(input_ids=ids[shard], attention_mask=mask[shard], labels=ids[shard]).loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.prompt_encoder.named_parameters()}, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    from test_integration_hf import _batch, _pair

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "grads.pt")
    _, model = _pair("llama")
    model.eval()
    ids, mask = _batch("none", batch=4)
    # Equal token counts per shard: DDP's mean of the two shard losses' gradients is the full batch's.
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, param in model.prompt_encoder.named_parameters():
        torch.testing.assert_close(ddp_grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
