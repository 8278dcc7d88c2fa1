"""Casting the convolution weights together gives autocast's step exactly, in fewer operators, and
in fewer kernels when compiled."""

import pytest
import torch
import torch._inductor.config

from tests.conftest import build_model, perturb_, random_batch
from tests.run_helpers import fit_on_batches
from vdvae import VDVAEModule
from vdvae.bench import OpCounter, model_hparams
from vdvae.model import cast_weights
from vdvae.model.cast_weights import call_with_cast_weights, cast_conv_weights


def bf16_step(model, run):
    """Loss, gradients and the operators dispatched by one bf16-autocast forward + backward."""
    x, target = random_batch(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with OpCounter() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(model, x, target).loss.mean()
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ops.count


def plain(model, x, target):
    return model(x, target)


def cast_together(model, x, target):
    return torch.func.functional_call(model, cast_conv_weights(model, torch.bfloat16), (x, target))


@pytest.mark.parametrize("options", [[], ["channels_last=true"], ["channels_last=true", "checkpointing=true"]])
def test_weights_cast_together_give_the_autocast_step_exactly(options):
    model = perturb_(build_model("tiny", *options))
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    loss, grads, ops = bf16_step(model, plain)
    loss_t, grads_t, ops_t = bf16_step(model, cast_together)
    assert torch.equal(loss_t, loss)
    for name in grads:
        assert torch.equal(grads_t[name], grads[name]), name
        assert grads_t[name].stride() == grads[name].stride(), name  # the optimizer sees the same layout
    # Four casts per convolution (weight, bias, and their gradients) become two allocations and two cats.
    assert ops - ops_t == 4 * n_convs - 4


def test_the_cpu_keeps_autocast_casting_per_weight():
    model = perturb_(build_model("tiny"))
    assert bf16_step(model, call_with_cast_weights)[2] == bf16_step(model, plain)[2]


@torch._inductor.config.patch(fallback_random=True)
def test_compiled_step_with_weights_cast_together_has_fewer_kernels():
    """Inductor generates about four kernels fewer per convolution for the bf16 step once the
    weights come in cast; the loss and gradients stay those of the eager step."""
    import torch._inductor.metrics as metrics

    small = ["enc_blocks='8x1,8d8,1x1'", "dec_blocks='1x1,8m1,8x1'", "channels_last=true"]
    eager = perturb_(build_model("tiny", *small))
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in eager.modules())
    kernels, results = {}, {}
    for name, run in [("bf16", plain), ("cast", cast_together)]:
        torch._dynamo.reset()
        compiled = build_model("tiny", *small)
        compiled.load_state_dict(eager.state_dict())
        compiled.compile()
        metrics.reset()
        x, target = random_batch(compiled)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(compiled, x, target).loss.mean().backward()
        kernels[name] = metrics.generated_kernel_count
        results[name] = bf16_step(compiled, run)
    assert kernels["bf16"] - kernels["cast"] >= 3 * n_convs, (kernels, n_convs)
    loss, grads, _ = bf16_step(eager, cast_together)
    loss_c, grads_c, _ = results["cast"]
    torch.testing.assert_close(loss_c, loss, rtol=1e-3, atol=1e-3)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0.05, atol=1e-3, msg=name)


def test_training_with_weights_cast_together_is_training_with_autocast(monkeypatch):
    """A few Lightning bf16 steps (clipping, fused AdamW, EMA) give the same weights either way:
    the path accelerators take, run here on the CPU."""

    def train(cast_per_weight_on):
        monkeypatch.setattr(cast_weights, "CAST_PER_WEIGHT_ON", cast_per_weight_on)
        torch.manual_seed(0)
        module = VDVAEModule(**model_hparams("tiny", ["model.vae.channels_last=true", "model.warmup_steps=1"]))
        batches = [random_batch(module.vae, seed=i) for i in range(3)]
        fit_on_batches(module, batches, precision="bf16-mixed")
        return module.state_dict()

    per_weight, together = train({"cpu"}), train(set())
    for name, value in per_weight.items():
        assert torch.equal(together[name], value), name
