"""The whole training step as one function of tensors, for torch.compile to capture in one graph and
CUDA graphs to replay (`model.cuda_graphs=true`).

Forward, gradients (torch.func.grad_and_value, so no `.backward()` or autograd hook breaks the graph),
global-norm clipping, the skip decision, the optimizer's update, the EMA and the step counters stay on
the device in one graph: nothing is read back to the host. The update is written out here, as
torch.optim.AdamW (decoupled weight decay) and torch.optim.Adamax (weight decay as L2) compute it, on
the optimizer's own state tensors, so checkpoints and resume are those of the eager step and either
step continues the other's run. A skipped update leaves the weights, the optimizer state and the EMA
exactly as they were, as the eager step's fused AdamW does with `found_inf`.
"""

import torch
from torch.func import functional_call, grad_and_value

# The order of the statistics the step returns (one small tensor, so one copy out of the graph's memory).
STATS = ("loss", "bpd", "distortion", "rate", "grad_norm", "skipped", "kl_weight")


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
    return None


def compile_whole_step(module, optimizer, **compile_kwargs):
    """The module's training step as one compiled graph: `step(x, target) -> dict of STATS`.
    compile_kwargs go to torch.compile (the training run uses mode="reduce-overhead": CUDA graphs)."""
    step = WholeStep(module, optimizer)
    step.graph = torch.compile(step.run, fullgraph=True, dynamic=False, **compile_kwargs)
    return step


class WholeStep:
    """One update of `module` (a VDVAEModule) with its torch optimizer, run by `run` (eager, or compiled
    as `graph`). Reads the learning rate from the optimizer's param group at every call."""

    def __init__(self, module, optimizer):
        if len(optimizer.param_groups) != 1:
            raise ValueError("the whole step expects one parameter group")
        self.module, self.group = module, optimizer.param_groups[0]
        trained = [(n, p) for n, p in module.vae.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in trained], [p for _, p in trained]
        self.adamw = module.hparams.optimizer == "adamw"
        second = "exp_avg_sq" if self.adamw else "exp_inf"
        for p in self.params:
            state = optimizer.state[p]
            if not state:  # as the optimizer creates it on its first step (the step count on the device)
                state.update(
                    step=torch.zeros((), dtype=torch.float32, device=p.device),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    **{second: torch.zeros_like(p, memory_format=torch.preserve_format)},
                )
            elif state["step"].device != p.device:  # Adamax keeps it on the CPU
                state["step"] = state["step"].to(p.device, torch.float32)
        states = [optimizer.state[p] for p in self.params]
        self.steps = [s["step"] for s in states]
        self.first = [s["exp_avg"] for s in states]
        self.second = [s[second] for s in states]
        self.lr = torch.zeros((), device=module.device)
        # Tensors the graph updates in place keep their addresses, so CUDA graphs may replay over them.
        updated = (*self.params, *module.ema.parameters(), *self.steps, *self.first, *self.second, self.lr)
        for t in (*updated, module.attempted_steps, module.skipped_steps, module.consecutive_skips):
            torch._dynamo.mark_static_address(t)
        self.graph = self.run

    def __call__(self, x, target) -> dict:
        self.lr.fill_(self.group["lr"])
        torch.compiler.cudagraph_mark_step_begin()
        stats = self.graph(x, target).clone()  # the graph's output memory is reused by its next replay
        return dict(zip(STATS, stats.unbind(), strict=True))

    def run(self, x, target) -> torch.Tensor:
        module, h = self.module, self.module.hparams
        step = module.attempted_steps + 1

        def objective(params):
            out = functional_call(module.vae, params, (x, target))
            loss = out.loss.mean()
            value, kl_weight = module.objective(out, step)
            return value, torch.stack([loss, out.bpd.mean(), out.distortion.mean(), out.rate.mean(), kl_weight])

        params = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        grads, (_, terms) = grad_and_value(objective, has_aux=True)(params)
        grads = [grads[n] for n in self.names]
        # As torch.nn.utils.clip_grad_norm_ (on gradients, not .grad): the norm decides the skip, then clips.
        grad_norm = torch.nn.utils.get_total_norm(grads)
        torch._foreach_mul_(grads, torch.clamp(h.grad_clip / (grad_norm + 1e-6), max=1.0))
        bad = module.bad_update(terms[0], grad_norm)
        skip = bad.float()
        with torch.no_grad():
            self._update(grads, bad)
            module.update_ema(weight=(1.0 - module.ema_decay()) * (1.0 - skip))
            module.count_step(skip)
        return torch.cat([terms[:4], torch.stack([grad_norm, skip, terms[4]])])

    def _update(self, grads, skip):
        """The optimizer's update of every parameter, its moments and its step count, none where `skip`:
        each change is scaled by keep = 1 - skip, and keep = 0 leaves every tensor bit for bit."""
        beta1, beta2 = self.group["betas"]
        eps, decay, lr = self.group["eps"], self.group["weight_decay"], self.lr
        keep = 1.0 - skip.float()
        grads = [torch.where(skip, 0.0, g) for g in grads]  # a skipped update's gradient may be NaN
        torch._foreach_add_(self.steps, [keep] * len(self.steps))
        step = torch.clamp(self.steps[0], min=1.0)  # the same count for all; >= 1 keeps a skipped first step finite
        if self.adamw:  # decoupled weight decay, then Adam with bias corrections
            torch._foreach_lerp_(self.first, grads, (1 - beta1) * keep)
            torch._foreach_lerp_(self.second, torch._foreach_mul(grads, grads), (1 - beta2) * keep)
            denom = torch._foreach_div(torch._foreach_sqrt(self.second), torch.sqrt(1 - beta2**step))
            torch._foreach_add_(denom, eps)
            torch._foreach_mul_(self.params, 1 - lr * decay * keep)
        else:  # Adamax: weight decay as L2 on the gradient, an infinity-norm second moment
            grads = torch._foreach_add(grads, torch._foreach_mul(self.params, decay))
            torch._foreach_lerp_(self.first, grads, (1 - beta1) * keep)
            bound = torch._foreach_abs(grads)
            torch._foreach_add_(bound, eps)
            torch._foreach_mul_(bound, keep)
            torch._foreach_mul_(self.second, beta2**keep)
            torch._foreach_maximum_(self.second, bound)
            denom = torch._foreach_clamp_min(self.second, eps)  # the same values, but never 0 (a skipped first step)
        update = torch._foreach_div(self.first, denom)
        torch._foreach_mul_(update, -lr * keep / (1 - beta1**step))
        torch._foreach_add_(self.params, update)
