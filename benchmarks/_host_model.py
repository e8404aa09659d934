"""The models the host-time tools run (``host_cost.py``, ``host_step.py``): a Qwen2-shaped decoder
with 24 layers of the seeds' head layout (14 query / 2 KV heads), or a GPT-2-medium-shaped one (16
heads, attention dropout on, as GPT-2 trains), at tiny widths, random weights, so that a step's cost
is its launches and Python rather than arithmetic. No environment or Triton state is touched here:
each tool sets up Triton its own way before importing this."""
from __future__ import annotations

import copy

import torch

import prefixkern

IMPLS = ("floor_no_prefix", "peft_sdpa", "prefixkern")


def qwen2_shaped(impl: str, layers: int = 24, dtype: torch.dtype = torch.bfloat16):
    """The frozen base with no prefix (``floor_no_prefix``), stock PEFT prefix tuning (P=20, the
    MLP on) on ``sdpa`` (``peft_sdpa``), or the same adapter patched (``prefixkern``); the base's
    weights in ``dtype``; in training mode."""
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=256, hidden_size=112, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=14, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    return _with_prefix(config, impl, dtype)


def gpt2_shaped(impl: str, layers: int = 24, dtype: torch.dtype = torch.bfloat16):
    """``qwen2_shaped``'s three rows on GPT-2-medium's layout (24 layers of 16 heads) at tiny
    widths, with GPT-2's default dropout (0.1 on attention, residuals and embeddings): the e2e
    suite's gpt2-medium row, whose patched step draws a dropout seed per layer."""
    import transformers as tf

    config = tf.GPT2Config(vocab_size=256, n_embd=256, n_inner=64, n_layer=layers, n_head=16, n_positions=4096)
    return _with_prefix(config, impl, dtype)


MODELS = {"qwen2": qwen2_shaped, "gpt2": gpt2_shaped}


def _with_prefix(config, impl: str, dtype: torch.dtype):
    import transformers as tf
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    attn = "eager" if impl == "prefixkern" else "sdpa"
    base = tf.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).to(dtype).train()
    if impl == "floor_no_prefix":
        for p in base.parameters():
            p.requires_grad_(False)
        return base
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                    prefix_projection=True))
    return prefixkern.patch(model) if impl == "prefixkern" else model


def training_loss(model, impl: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One training forward's loss. The floor (frozen, no prefix) takes its input embeddings as a
    leaf, so its gradients still flow back through every layer, as in the e2e suite's floor."""
    if impl == "floor_no_prefix":
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        return model(inputs_embeds=embeds, attention_mask=mask, labels=ids).loss
    return model(input_ids=ids, attention_mask=mask, labels=ids).loss


class OneOpAttention(torch.autograd.Function):
    """What a GPU's flash SDPA costs the host, roughly: one allocation forward, three backward (a
    fused kernel's outputs), no arithmetic; q, k and v get gradients, so the backward still runs
    through every projection. (``empty_like`` makes no kernel: ``host_cost.py`` counts none here.)"""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.kv = (k, v)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad):
        k, v = ctx.kv
        return torch.empty_like(grad), torch.empty_like(k), torch.empty_like(v)


def one_op_sdpa():
    """A context in which ``F.scaled_dot_product_attention`` is ``OneOpAttention``."""
    import torch.nn.functional as F

    from prefixkern._backend import override_global

    return override_global(vars(F), "scaled_dot_product_attention",
                           lambda query, key, value, *args, **kwargs: OneOpAttention.apply(query, key, value))
