"""The whole training step (`model.cuda_graphs`): one graph with no breaks or recompilation, the eager step's updates,
skips that change nothing, a graph for dynamo that does not grow with the network, weights and optimizer state in
flat buffers that keep every value, layout and checkpoint, and a clear fallback to the eager step where CUDA graphs
cannot run.

On the CPU the graph runs with eager kernels, so that its random draws equal the eager step's: with the
aot_eager backend (the graph and its autograd as inductor receives them) for AdamW, with dynamo's graph
alone for the Efficient-VDVAE options (each compile takes tens of seconds here)."""

import io

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import TINY_VAE
from tests.test_train import fit_on_batches
from vdvae import VDVAEModule
from vdvae.lifecycle import route_library_logs
from vdvae.whole_step import WholeStep, compile_whole_step

# Two blocks each way, two latent groups; and seven each way, with channels_last.
SMALL_VAE = {**TINY_VAE, "enc_blocks": "8d8,1x1", "dec_blocks": "1x1,8m1"}
DEEPER_VAE = {**TINY_VAE, "enc_blocks": "8x3,8d8,1x3", "dec_blocks": "1x3,8m1,8x3", "channels_last": True}
# Efficient-VDVAE's options: Adamax, and the KL warm-up and balancing decided on the device.
EFFICIENT = dict(optimizer="adamax", kl_warmup_steps=3, kl_balancing_steps=2, ema_warmup=False, ema_decay=0.9)


def batches():
    """Good, NaN, good, huge (a gradient norm far above the threshold), good."""
    x = (torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() - 127.5) / 127.5
    good = (x, x.clone())  # inputs and targets never one tensor: dynamo guards on aliasing
    return [good, (torch.full_like(x, float("nan")), x), good, (x * 1e6, x), good]


def module(vae=SMALL_VAE, **options):
    torch.manual_seed(0)
    return VDVAEModule(vae, **{"warmup_steps": 2, "lr": 1e-3, "skip_threshold": 1e4, **options})


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, backend", [({}, "aot_eager"), (EFFICIENT, "eager")], ids=["adamw", "adamax-kl-warmup-balancing"]
)
def test_the_compiled_whole_step_is_one_graph_and_trains_as_the_eager_step(options, backend, monkeypatch):
    losses = {}

    def fit(m):
        losses[m] = []
        m.on_train_batch_end = lambda outputs, batch, idx: losses[m].append(outputs["loss"].item())
        torch.manual_seed(1)
        return fit_on_batches(m, batches())

    eager = module(**options)
    eager_states = fit(eager)
    whole = module(**options)
    monkeypatch.setattr("vdvae.lit_module.build_whole_step", lambda m, o: compile_whole_step(m, o, backend=backend))
    torch._dynamo.reset()
    counters.clear()
    whole_states = fit(whole)

    # fullgraph=True fails on any graph break; one graph over the 5 steps means no recompilation either.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

    assert isinstance(whole._whole_step, WholeStep) and whole.trainer.global_step == 5  # Lightning counted it
    assert int(whole.skipped_steps) == int(eager.skipped_steps) == 2
    assert int(whole.attempted_steps) == 5 and int(whole.consecutive_skips) == 0
    assert losses[whole] == pytest.approx(losses[eager], rel=1e-5, nan_ok=True)
    for i, ((weights, ema), (eager_weights, eager_ema)) in enumerate(zip(whole_states, eager_states, strict=True)):
        for a, b in zip(weights + ema, eager_weights + eager_ema, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"before step {i}")
    for skipped in (1, 3):  # the NaN and the huge batch change nothing, bit for bit
        for a, b in zip(sum(whole_states[skipped], []), sum(whole_states[skipped + 1], []), strict=True):
            assert torch.equal(a, b)
    # The same optimizer state, in the same layout: a checkpoint of either step resumes with the other.
    state, eager_state = whole.trainer.optimizers[0].state_dict(), eager.trainer.optimizers[0].state_dict()
    assert state["state"].keys() == eager_state["state"].keys()
    for key, values in eager_state["state"].items():
        assert values.keys() == state["state"][key].keys()
        for name, value in values.items():
            assert state["state"][key][name].dtype == value.dtype, name
            # The first moment is (1 - beta1)-weighted clipped gradients: equal moments, equal gradients.
            torch.testing.assert_close(state["state"][key][name], value, rtol=1e-5, atol=1e-7)


def test_cuda_graphs_on_the_cpu_warns_and_trains_with_the_eager_step():
    route_library_logs()  # as train() does, before pytest.warns records
    m = module(cuda_graphs=True)
    with pytest.warns(UserWarning, match="model.cuda_graphs=true: CUDA graphs need a CUDA device.*eager step"):
        fit_on_batches(m, batches()[:2])
    assert m._whole_step is False and int(m.attempted_steps) == 2


def test_dynamo_traces_one_small_graph_whatever_the_depth_and_the_options():
    """The weights are one flat tensor and the VAE's forward one opaque call, so dynamo's graph (and its trace
    time) does not grow with the blocks and parameters: the cifar10 preset's is the tiny model's. The optimizer's
    and the recipe's options are tensors of the graph, not constants: a sweep over them compiles one graph."""
    options = dict(lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, grad_clip=50.0, skip_threshold=77.0)
    graphs = {}
    for name, vae, changes in [("small", SMALL_VAE, {}), ("deeper", DEEPER_VAE, {}), ("options", SMALL_VAE, options)]:
        m = module(vae, **changes, ema_decay=0.7 if changes else 0.5)

        def keep(graph, example_inputs, name=name):
            graphs[name] = graph
            return graph.forward

        step = compile_whole_step(m, m.configure_optimizers()["optimizer"], backend=keep)
        step(*batches()[0])
    assert len(list(module(DEEPER_VAE).parameters())) > 2 * len(list(module(SMALL_VAE).parameters()))
    sizes = {name: sum(node.op == "call_function" for node in g.graph.nodes) for name, g in graphs.items()}
    assert len(set(sizes.values())) == 1 and sizes["small"] < 200, sizes
    assert graphs["options"].code == graphs["small"].code


def test_the_flat_buffers_keep_every_value_layout_and_checkpoint():
    m = module(DEEPER_VAE)
    fit_on_batches(m, batches()[:1])  # the eager step: an optimizer state to move
    optimizer = m.trainer.optimizers[0]

    def tensors():
        return [*m.vae.parameters(), *m.ema.parameters(), *(t for s in optimizer.state.values() for t in s.values())]

    def layout(t):  # the strides that matter (a dimension of size 1 may have any)
        return [stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1]

    before = [(t.clone(), layout(t)) for t in tensors()]
    size_before = saved(m)[0]
    assert any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t, _ in before)
    step = WholeStep(m, optimizer)
    for t, (value, stride) in zip(tensors(), before, strict=True):
        assert torch.equal(t, value) and layout(t) == stride
    flats = (step.weights, step.ema, step.first, step.second, step.steps)
    for flat in flats:
        flat.add_(1.0)  # every tensor is a view of its buffer: it changes with it
    for t, (value, _) in zip(tensors(), before, strict=True):
        torch.testing.assert_close(t, value + 1.0)
    # A checkpoint stores each buffer once (not once per view): the size of the one saved before packing.
    fresh = module(DEEPER_VAE)
    fresh.load_state_dict(saved(m)[1]["model"])
    for a, b in zip(fresh.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert saved(m)[0] < 1.02 * size_before


def saved(m):
    """The size of m's weights and optimizer state saved by torch.save, and what torch.load reads back."""
    buffer = io.BytesIO()
    torch.save({"model": m.state_dict(), "optimizer": m.trainer.optimizers[0].state_dict()}, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return size, torch.load(buffer, weights_only=True)
