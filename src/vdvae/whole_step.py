"""The whole training step as one function of tensors, for torch.compile to capture in one graph and
CUDA graphs to replay (`model.cuda_graphs=true`).

Forward, gradients (torch.func.grad_and_value, so no `.backward()` or autograd hook breaks the graph),
global-norm clipping, the skip decision, the optimizer's update, the EMA and the step counters stay on
the device in one graph: nothing is read back to the host. The update is written out here, as
torch.optim.AdamW (decoupled weight decay) and torch.optim.Adamax (weight decay as L2) compute it, on
the optimizer's own state tensors, so checkpoints and resume are those of the eager step and either
step continues the other's run. A skipped update leaves the weights, the optimizer state and the EMA
exactly as they were, as the eager step's fused AdamW does with `found_inf`.

Capture in seconds: the weights, the EMA, each optimizer moment and the step counts each live in one
flat buffer, every parameter (or state tensor) a view of its part, so the graph updates a handful of
tensors instead of a thousand (the cifar10 preset has 1,393 parameters, which cost dynamo most of its
trace). The VAE's forward is one opaque call for dynamo (torch._dynamo.nonstrict_trace): dynamo does not
interpret its Python, AOTAutograd traces it at the operator level, once, into the same graph.
"""

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.func import functional_call, grad_and_value

from vdvae.model.vae import ELBO

# The order of the statistics the step returns (one small tensor, so one copy out of the graph's memory).
STATS = ("loss", "bpd", "distortion", "rate", "grad_norm", "skipped", "kl_weight")
# Options the graph reads from device memory rather than holding as constants: graphs that differ only in
# them are one graph, so the jobs of a sweep over them reuse the first job's compile (inductor's cache).
OPTIONS = ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "skip_threshold", "ema_decay")


def unavailable_reason(module) -> str | None:
    """Why the captured step cannot run for this module and trainer, or None when it can."""
    if module.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and this run is on {module.device.type}"
    if module.trainer.world_size > 1:
        return f"the captured step does not all-reduce gradients across the {module.trainer.world_size} processes"
    if module.vae.checkpointing:
        return "activation checkpointing (model.vae.checkpointing=true) recomputes inside the backward pass"
    if module.accumulate_grad_batches > 1:
        return "gradient accumulation (trainer.accumulate_grad_batches) runs several backward passes per update"
    dtypes = {p.dtype for p in module.vae.parameters()}
    if dtypes != {torch.float32}:
        return f"the captured step updates float32 weights, and these are {', '.join(map(str, dtypes))}"
    if not hasattr(torch._dynamo, "nonstrict_trace"):
        return f"the captured step needs torch._dynamo.nonstrict_trace (torch >= 2.8), not torch {torch.__version__}"
    return None


def build_whole_step(module, optimizer):
    """With `model.cuda_graphs`, the whole step compiled for CUDA graphs; else (or where it cannot run, with
    a warning saying why) False: the eager step."""
    if not module.hparams.cuda_graphs:
        return False
    reason = unavailable_reason(module)
    if reason:
        rank_zero_warn(f"model.cuda_graphs=true: {reason}; training runs the eager step instead")
        return False
    return compile_whole_step(module, optimizer, mode="reduce-overhead")


def compile_whole_step(module, optimizer, **compile_kwargs):
    """The module's training step as one compiled graph: `step(x, target) -> dict of STATS`.
    compile_kwargs go to torch.compile (the training run uses mode="reduce-overhead": CUDA graphs)."""
    step = WholeStep(module, optimizer)
    step.graph = torch.compile(step.run, fullgraph=True, dynamic=False, **compile_kwargs)
    return step


class Layout:
    """Where tensors of given shapes and strides sit in one flat buffer: `views(flat)` gives each of them
    as a view of its part (split, then view and permute: ops whose gradients are cheap, unlike as_strided)."""

    def __init__(self, tensors):
        self.numels = [t.numel() for t in tensors]
        self.shapes = []  # per tensor: its dimensions in memory order, and the permutation back
        for t in tensors:
            strides = torch.empty_like(t).stride()  # dense strides in t's memory format
            order = sorted(range(t.dim()), key=lambda d: (-strides[d], d))
            self.shapes.append(([t.shape[d] for d in order], [order.index(d) for d in range(t.dim())]))

    def views(self, flat):
        parts = flat.split(self.numels)
        return [part.view(shape).permute(back) for part, (shape, back) in zip(parts, self.shapes, strict=True)]

    @torch.no_grad()
    def pack(self, tensors, like) -> torch.Tensor:
        """A new flat buffer holding `tensors`' values, each tensor's data now a view of its part."""
        flat = torch.empty(sum(self.numels), dtype=like.dtype, device=like.device)
        for t, view in zip(tensors, self.views(flat), strict=True):
            view.copy_(t)
            t.data = view
        return flat


class WholeStep:
    """One update of `module` (a VDVAEModule) with its torch optimizer, run by `run` (eager, or compiled
    as `graph`). Reads the learning rate from the optimizer's param group at every call. Building it
    moves the weights, the EMA and the optimizer state into flat buffers (the same values)."""

    def __init__(self, module, optimizer):
        if len(optimizer.param_groups) != 1:
            raise ValueError("the whole step expects one parameter group")
        self.module, self.group = module, optimizer.param_groups[0]
        names, params = zip(*module.vae.named_parameters(), strict=True)
        if any(not p.requires_grad for p in params) or {p.dtype for p in params} != {torch.float32}:
            raise ValueError("the whole step trains every parameter of the VAE, all float32 (see unavailable_reason)")
        if set(map(id, self.group["params"])) != set(map(id, params)):
            raise ValueError("the whole step expects the optimizer to hold exactly the VAE's parameters")
        self.names, self.adamw = names, module.hparams.optimizer == "adamw"
        second = "exp_avg_sq" if self.adamw else "exp_inf"
        for p in params:
            state = optimizer.state[p]
            if not state:  # as the optimizer creates it on its first step (the step count on the device)
                state.update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p))
                state[second] = torch.zeros_like(p)
            state["step"] = state["step"].to(p.device, torch.float32)  # Adamax keeps it on the CPU
        states = [optimizer.state[p] for p in params]
        self.layout, like = Layout(params), params[0]
        self.weights = self.layout.pack(params, like)
        self.ema = self.layout.pack(list(module.ema.parameters()), like)
        self.first = self.layout.pack([s["exp_avg"] for s in states], like)
        self.second = self.layout.pack([s[second] for s in states], like)
        steps = [s["step"] for s in states]
        self.steps = Layout(steps).pack(steps, like)
        h, g = module.hparams, self.group
        values = (0, *g["betas"], g["eps"], g["weight_decay"], h.grad_clip, h.skip_threshold or 0, h.ema_decay)
        self.options = {
            name: torch.tensor(float(v), device=module.device) for name, v in zip(OPTIONS, values, strict=True)
        }
        # Tensors the graph updates in place keep their addresses, so CUDA graphs may replay over them.
        updated = (self.weights, self.ema, self.first, self.second, self.steps, *self.options.values())
        for t in (*updated, module.attempted_steps, module.skipped_steps, module.consecutive_skips):
            torch._dynamo.mark_static_address(t)
        self.elbo_terms = torch._dynamo.nonstrict_trace(self._elbo_terms)
        self.graph = self.run

    def _elbo_terms(self, weights, x, target):
        """log p(x|z) and the KL per group of the VAE with these flat `weights` (one opaque call for dynamo),
        as one (N, 1 + groups) tensor: a single tensor is the output every torch's nonstrict_trace takes."""
        out = functional_call(
            self.module.vae, dict(zip(self.names, self.layout.views(weights), strict=True)), (x, target)
        )
        return torch.cat([out.log_px_z[:, None], out.kl], dim=1)

    def __call__(self, x, target) -> dict:
        self.options["lr"].fill_(self.group["lr"])  # the schedule's, at every step
        torch.compiler.cudagraph_mark_step_begin()
        stats = self.graph(x, target).clone()  # the graph's output memory is reused by its next replay
        return dict(zip(STATS, stats.unbind(), strict=True))

    def run(self, x, target) -> torch.Tensor:
        module = self.module
        step, ndims = module.attempted_steps + 1, target[0].numel()

        def objective(weights):
            terms = self.elbo_terms(weights, x, target)
            out = ELBO(log_px_z=terms[:, 0], kl=terms[:, 1:], ndims=ndims)
            value, kl_weight = module.objective(out, step)
            return value, torch.stack(
                [out.loss.mean(), out.bpd.mean(), out.distortion.mean(), out.rate.mean(), kl_weight]
            )

        grad, (_, terms) = grad_and_value(objective, has_aux=True)(self.weights.detach())
        # As torch.nn.utils.clip_grad_norm_: the norm (over all parameters) decides the skip, then clips.
        o = self.options
        grad_norm = torch.linalg.vector_norm(grad)
        grad = grad * torch.clamp(o["grad_clip"] / (grad_norm + 1e-6), max=1.0)
        bad = module.bad_update(terms[0], grad_norm, o["skip_threshold"])
        skip = bad.float()
        with torch.no_grad():
            self._update(grad, bad)
            weight = (1.0 - module.ema_decay(o["ema_decay"])) * (1.0 - skip)
            self.ema.lerp_(self.weights, weight)  # as module.update_ema
            module.count_step(skip)
        return torch.cat([terms[:4], torch.stack([grad_norm, skip, terms[4]])])

    def _update(self, grad, skip):
        """The optimizer's update of the weights, their moments and the step counts, none where `skip`:
        each change is scaled by keep = 1 - skip, and keep = 0 leaves every tensor bit for bit."""
        o = self.options
        beta1, beta2, eps, decay, lr = o["beta1"], o["beta2"], o["eps"], o["weight_decay"], o["lr"]
        keep = 1.0 - skip.float()
        grad = torch.where(skip, 0.0, grad)  # a skipped update's gradient may be NaN
        self.steps.add_(keep)
        step = torch.clamp(self.steps[0], min=1.0)  # the same count for all; >= 1 keeps a skipped first step finite
        if self.adamw:  # decoupled weight decay, then Adam with bias corrections
            self.first.lerp_(grad, (1 - beta1) * keep)
            self.second.lerp_(grad * grad, (1 - beta2) * keep)
            denom = self.second.sqrt() / torch.sqrt(1 - beta2**step) + eps
            self.weights.mul_(1 - lr * decay * keep)
        else:  # Adamax: weight decay as L2 on the gradient, an infinity-norm second moment
            grad = grad + self.weights * decay
            self.first.lerp_(grad, (1 - beta1) * keep)
            self.second.mul_(beta2**keep)
            self.second.copy_(torch.maximum(self.second, (grad.abs() + eps) * keep))
            denom = self.second.clamp_min(eps)  # the same values, but never 0 (a skipped first step)
        self.weights.add_(self.first / denom * (-lr * keep / (1 - beta1**step)))
