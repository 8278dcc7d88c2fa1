"""Benchmark: training, evaluation and sampling throughput, peak memory, FLOPs per image and the
fraction of the device's measured peak, for a model preset; optionally side by side with the
original VDVAE code from a local copy (never part of this package).

    python -m vdvae.bench --preset cifar10 --batch 8 --device cpu --configs fp32 fp32-cl bf16-cl --out bench.json
    python -m vdvae.bench ... --original /path/to/openai-vdvae     # adds the "original" config
    python -m vdvae.bench --preset small --batch 32 --configs fp32-cl fp32-cl+model.vae.activation=silu+batch=64
    python -m vdvae.bench --device cpu --preset cifar10 --batch 2 --configs fp32-cl-graphs --capture-only --out f.json

A config may carry `+`-joined changes: `batch=N` (its own batch size) or a `model.` override.

A training step is the real one: Lightning, the data pipeline (uint8 to the device, preprocessing
there), forward, backward, clipping, the skip decision, AdamW and the EMA. Every config runs in its
own process, so that peak memory (CUDA: allocator peak; CPU: peak resident set above the memory
in use before the model is built) is its own; `--allocated-memory` adds, on the CPU, the peak of
live tensor memory (what the CUDA figure measures), free of the C allocator's fragmentation.
Times are medians over `--steps` after `--warmup` steps, and over `--repeats` rounds through all
configs; compare configs of one run only. The JSON is written after every config; a config that fails is
reported (under "failed") while the others still run, and the bench then exits non-zero.

`--capture-only` times what a `-graphs` config costs before its first step instead: dynamo's trace of
the whole step (`trace_s`), the backend's compile of that graph (`compile_s`: inductor, with CUDA graphs
on a GPU, as training compiles it; none with `--capture-backend eager`) and the first step as a whole,
each config in a fresh process with an empty compile cache (or `--cache-dir`, shared and kept).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vdvae.original import to_original_hparams

# name -> (precision, channels_last, compile, checkpointing, cuda_graphs)
CONFIGS = {
    "fp32": ("32-true", False, False, False, False),
    "fp32-cl": ("32-true", True, False, False, False),
    "fp32-cl-compile": ("32-true", True, True, False, False),
    "fp32-cl-graphs": ("32-true", True, False, False, True),
    "fp32-ckpt": ("32-true", True, False, True, False),
    "bf16": ("bf16-mixed", False, False, False, False),
    "bf16-cl": ("bf16-mixed", True, False, False, False),
    "bf16-cl-compile": ("bf16-mixed", True, True, False, False),
    "bf16-cl-graphs": ("bf16-mixed", True, False, False, True),
    "bf16-ckpt": ("bf16-mixed", True, False, True, False),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


BASELINE_MB = 0.0  # resident memory before the model exists (CPU), subtracted from the peak
PROFILED_STEPS = 3  # on a GPU, after the timed steps: how busy the GPU is in a step


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(device) -> float:
    """Peak memory of the run: CUDA allocator peak, or the CPU peak resident set above the baseline."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - BASELINE_MB  # ru_maxrss: KiB on Linux


def peak_flops(device, dtype) -> float:
    """Measured FLOP/s of the device at `dtype`: the best of a large matrix product and a large
    3x3 convolution (channels_last), each the fastest of a few runs. Sizes shrink where the device is
    slow at `dtype` (bf16 without native support on a CPU): each call is kept near a quarter second."""
    import torch.nn.functional as F

    budget_s = 0.25

    def matmul(n):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        return (lambda: a @ b), 2 * n**3

    def conv(batch):
        x = torch.randn(batch, 256, 32, 32, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        return (lambda: F.conv2d(x, w, padding=1)), 2 * x.numel() * 256 * 9

    best = 0.0
    # (kernel, its size at which to estimate the rate, its largest size, its FLOPs at a size)
    kernels = [
        (matmul, 256, 8192 if device.type == "cuda" else 2048, lambda n: 2 * n**3),
        (conv, 1, 16, lambda batch: batch * 2 * 256 * 32 * 32 * 256 * 9),
    ]
    for make, small, size, flops_at in kernels:
        run, flops = make(small)
        rate = flops / timed(run, device, repeats=2, reduce=min)  # a first estimate at the small size
        while size > small and flops_at(size) / rate > budget_s:
            size //= 2
        run, flops = make(size)
        best = max(best, flops / timed(run, device, repeats=5, reduce=min))
    return best


def model_hparams(preset: str, overrides=()):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("vdvae.conf", version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+model={preset}", *overrides])
    hparams = OmegaConf.to_container(cfg.model)
    hparams.pop("_target_"), hparams.pop("_convert_")
    return hparams


def synthetic_data(vae_hparams, batch, n_batches):
    from vdvae.data.base import ImageDataModule, TensorImages

    class Synthetic(ImageDataModule):
        name = "synthetic"

        def load(self):
            s, c = vae_hparams["image_size"], vae_hparams["image_channels"]
            images = TensorImages(torch.randint(0, 256, (batch * n_batches, c, s, s), dtype=torch.uint8))
            return images, images, images

    return Synthetic(
        root=".",
        image_size=vae_hparams["image_size"],
        channels=vae_hparams["image_channels"],
        batch_size=batch,
        bits=vae_hparams["bits"],
        shift=-127.5,
        scale=1 / 127.5,
    )


class StepTimer:
    """Wall time of every training batch (Lightning's whole step), synchronized with the device. On a
    GPU, the steps from `profile_from` on also run under the profiler, for `busy`: the fraction of
    their time in which the GPU runs kernels or copies (the rest it waits for the host to dispatch)."""

    def __init__(self, device, profile_from=None):
        self.device, self.times, self._start = device, [], None
        self.profile_from = profile_from if device.type == "cuda" else None
        self.profiler, self.busy = None, None

    def on_train_batch_start(self, *args):
        sync(self.device)
        if self.profile_from is not None and len(self.times) == self.profile_from:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CUDA])
            self.profiler.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args):
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, *args):
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        self.busy = gpu_busy_fraction(self.profiler, sum(self.times[self.profile_from :]))


def gpu_busy_fraction(profiler, wall_s: float) -> float:
    """The share of `wall_s` in which the GPU ran anything the profiler saw: kernels, copies, fills."""
    events = profiler.profiler.kineto_results.events()
    gpu = [(e.start_ns(), e.end_ns()) for e in events if e.device_type() == torch.autograd.DeviceType.CUDA]
    return covered_ns(gpu) / 1e9 / wall_s


def covered_ns(intervals) -> float:
    """The length of the union of (start, end) intervals: time in which at least one of them runs."""
    covered, reached = 0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, views aside. Each costs the host its
    dispatch and, on a GPU, mostly one kernel launch: the bound on an eager step whose kernels are
    too small to keep the device busy."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def step_counts(vae, x, target, autocast) -> dict:
    """FLOPs per image of one forward and of forward + backward (torch's FLOP counter), and the
    operators one forward + backward dispatches (OpCounter), under `autocast`. Both are counted in
    eager mode, for a compiled model too."""
    from torch.utils.flop_counter import FlopCounterMode

    vae.zero_grad()  # as in a training step: no accumulation into earlier gradients
    with torch.compiler.set_stance("force_eager"), OpCounter() as ops:
        with FlopCounterMode(display=False) as forward, autocast:
            loss = vae(x, target).loss.mean()
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    n = x.shape[0]
    return {
        "gflop_per_image_forward": forward.get_total_flops() / n / 1e9,
        "gflop_per_image_train": (forward.get_total_flops() + backward.get_total_flops()) / n / 1e9,
        "aten_ops_per_forward_backward": ops.count,
    }


def timed(fn, device, repeats, warmup=1, reduce=statistics.median):
    """Seconds per call of fn over `repeats` calls: `reduce` (median) of those after the first `warmup`."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return reduce(times[warmup:] or times)


def parse_config(spec: str) -> tuple[str, int | None, list[str]]:
    """ "fp32-cl+batch=64+model.vae.activation=silu" -> ("fp32-cl", 64, ["model.vae.activation=silu"])."""
    name, *changes = spec.split("+")
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r} in {spec!r}; choose from {', '.join(CONFIGS)}")
    batch, overrides = None, []
    for change in changes:
        if change.startswith("batch=") and change[6:].isdigit() and int(change[6:]) > 0:
            batch = int(change[6:])
        elif change.startswith("model.") and "=" in change:
            overrides.append(change)
        else:
            raise ValueError(f"config {spec!r}: {change!r} is neither batch=N nor a model.KEY=VALUE override")
    return name, batch, overrides


def run_ours(args, spec, device, train_only=False):
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from vdvae.lit_module import VDVAEModule

    name, batch, overrides = parse_config(spec)
    args.batch = batch or args.batch
    precision, channels_last, compile_, checkpointing, cuda_graphs = CONFIGS[name]
    hparams = model_hparams(
        args.preset,
        [
            f"model.vae.channels_last={channels_last}",
            f"model.vae.checkpointing={checkpointing}",
            f"model.compile={compile_}",
            f"model.cuda_graphs={cuda_graphs}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    module = VDVAEModule(**hparams)
    steps = args.warmup + args.steps + (PROFILED_STEPS if device.type == "cuda" else 0)
    data = synthetic_data(hparams["vae"], args.batch, steps)
    timer = StepTimer(device, profile_from=args.warmup + args.steps)
    hooks = ("on_train_batch_start", "on_train_batch_end", "on_train_end")
    callback = type("Timer", (Callback,), {hook: getattr(timer, hook) for hook in hooks})()
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[callback],
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    step = statistics.median(timer.times[args.warmup : args.warmup + args.steps])
    result = {
        "batch": args.batch,
        "train_images_per_s": args.batch / step,
        "train_step_s": step,
        "first_step_s": timer.times[0],  # with model.compile or a -graphs config: the compile, too
        "skipped": int(module.skipped_steps),
        "peak_memory_mb": peak_memory_mb(device),
    }
    if timer.busy is not None:
        result["gpu_busy_fraction"] = timer.busy
    if train_only:
        return result
    vae = module.ema.to(device)
    x, target = data.preprocess(
        torch.randint(0, 256, (args.batch, *data.train_set[0].shape), dtype=torch.uint8).to(device)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    with torch.no_grad(), autocast:
        result["eval_images_per_s"] = args.batch / timed(lambda: vae(x, target), device, 3)
        result["sample_images_per_s"] = args.batch / timed(lambda: vae.sample(args.batch), device, 3)
    result.update(step_counts(module.vae.to(device), x, target, autocast))
    return result


def capture_step(args, spec, device) -> dict:
    """The whole step of a `-graphs` config compiled as training compiles it, without Lightning: the seconds
    of dynamo's trace, of the backend's compile, and of the first (compiling) step, with the graph's size."""
    from torch._dynamo.utils import counters

    from vdvae.lit_module import VDVAEModule
    from vdvae.whole_step import compile_whole_step

    name, batch, overrides = parse_config(spec)
    args.batch = batch or args.batch
    precision, channels_last, _, _, _ = CONFIGS[name]
    # The schedule does not reach the graph (it reads the learning rate as a tensor): constant, so that no
    # trainer need tell a cosine its length.
    changes = [f"model.vae.channels_last={channels_last}", "model.lr_schedule=constant", *overrides]
    hparams = model_hparams(args.preset, changes)
    torch.manual_seed(0)
    module = VDVAEModule(**hparams).to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    v = hparams["vae"]
    images = torch.randint(0, 256, (args.batch, v["image_channels"], v["image_size"], v["image_size"]))
    x, target = synthetic_data(v, args.batch, 1).preprocess(images.to(device, torch.uint8))
    times, start = {}, 0.0

    def timed_backend(graph, example_inputs):
        times["trace_s"] = time.perf_counter() - start
        times["graph_ops"] = sum(node.op == "call_function" for node in graph.graph.nodes)
        if args.capture_backend == "eager":
            return graph.forward
        began = time.perf_counter()
        if args.capture_backend == "inductor":
            mode = torch._inductor.list_mode_options("reduce-overhead" if device.type == "cuda" else "default")
            compiled = torch._inductor.compile(graph, example_inputs, options=mode)
        else:
            compiled = torch._dynamo.lookup_backend(args.capture_backend)(graph, example_inputs)
        times["compile_s"] = time.perf_counter() - began
        return compiled

    step = compile_whole_step(module, optimizer, backend=timed_backend)
    counters.clear()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    with autocast:
        start = time.perf_counter()
        step(x, target)
        sync(device)
        times["first_step_s"] = time.perf_counter() - start
        # CUDA graphs record at the second or third call: those are part of capturing too.
        for _ in range(2):
            step(x, target)
        sync(device)
        times["capture_s"] = time.perf_counter() - start
    times["graphs"] = counters["stats"]["unique_graphs"]
    return {"batch": args.batch, "backend": args.capture_backend, **times, "peak_memory_mb": peak_memory_mb(device)}


def run_original(args, device):
    """The original code's training step (its model; AdamW from torch, as apex is CUDA-only), timed alike."""
    sys.path.insert(0, str(Path(args.original).resolve()))
    from vae import VAE as OriginalVAE  # the local copy given by --original

    hparams = model_hparams(args.preset)
    v = hparams["vae"]
    H = SimpleNamespace(**to_original_hparams(v), dataset="cifar10")
    torch.manual_seed(0)
    vae, ema = OriginalVAE(H).to(device), OriginalVAE(H).to(device)
    ema.load_state_dict(vae.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        vae.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"], betas=tuple(hparams["betas"])
    )
    images = torch.randint(
        0, 256, (args.batch, v["image_size"], v["image_size"], v["image_channels"]), device=device
    ).float()
    x, target = (images - 127.5) / 127.5, (images - 127.5) / 127.5

    def step():
        vae.zero_grad()
        stats = vae(x, target)
        stats["elbo"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), hparams["grad_clip"]).item()
        if not torch.isnan(stats["distortion"]).any() and grad_norm < hparams["skip_threshold"]:
            optimizer.step()
            with torch.no_grad():
                for p, q in zip(vae.parameters(), ema.parameters(), strict=True):
                    q.mul_(hparams["ema_decay"]).add_(p * (1 - hparams["ema_decay"]))

    s = timed(step, device, args.warmup + args.steps, warmup=args.warmup)
    result = {"train_images_per_s": args.batch / s, "train_step_s": s, "peak_memory_mb": peak_memory_mb(device)}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            wall = timed(step, device, PROFILED_STEPS, warmup=0, reduce=sum)
        result["gpu_busy_fraction"] = gpu_busy_fraction(profiler, wall)
    vae.zero_grad()
    with OpCounter() as ops:
        vae(x, target)["elbo"].backward()
    return result | {"aten_ops_per_forward_backward": ops.count}


def allocated_peak_mb(run) -> float:
    """Peak of live tensor memory on the CPU while `run()` builds a model and trains it: what the
    CUDA allocator's peak measures on a GPU, free of the C allocator's caching and fragmentation.
    Read from the profiler's memory events, which count only what is allocated while it runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]") / 2**20


def run_one(args):
    global BASELINE_MB
    import lightning  # noqa: F401  (imported before the baseline is taken)

    device = torch.device(args.device)
    BASELINE_MB = resident_mb()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.capture_only:
        return print(json.dumps(capture_step(args, args.single, device)))
    result = run_original(args, device) if args.single == "original" else run_ours(args, args.single, device)
    if args.allocated_memory:  # after the timings (the profiler would distort them), with a new model
        args.steps, args.warmup = 2, 0  # the second step runs with the optimizer state in place
        run = (
            (lambda: run_original(args, device))
            if args.single == "original"
            else lambda: run_ours(args, args.single, device, train_only=True)
        )
        result["allocated_peak_mb"] = allocated_peak_mb(run)
    dtype = torch.bfloat16 if args.single.startswith("bf16") else torch.float32
    peak = peak_flops(device, dtype)
    result["device_peak_gflops"] = peak / 1e9
    if "gflop_per_image_train" in result:
        result["fraction_of_peak"] = result["gflop_per_image_train"] * 1e9 * result["train_images_per_s"] / peak
    print(json.dumps(result))


def run_config(name, passed, cache_dir=None) -> dict:
    """One config in a fresh process, compiling into `cache_dir` (a new empty one if None); its JSON result,
    or {"error": the end of its output} if it failed (the other configs still run)."""
    cmd = [sys.executable, "-m", "vdvae.bench", "--single", name, *passed]
    with tempfile.TemporaryDirectory(prefix="vdvae-bench-cache-") as fresh:
        cache = str(cache_dir or fresh)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCHINDUCTOR_CACHE_DIR": cache}
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        print(f"bench config {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["fp32", "fp32-cl", "bf16-cl", "fp32-ckpt"],
        help=f"any of {', '.join(CONFIGS)}, each with optional +batch=N and +model.KEY=VALUE changes",
    )
    parser.add_argument("--original", help="a local copy of openai/vdvae: adds the 'original' config")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all configs; figures are medians")
    parser.add_argument(
        "--allocated-memory",
        action="store_true",
        help="CPU: also measure the peak of live tensor memory (a profiled run of a new model after the timed one)",
    )
    parser.add_argument(
        "--capture-only",
        action="store_true",
        help="time the capture of each -graphs config's whole step (trace, compile, first step), not its steps",
    )
    parser.add_argument(
        "--capture-backend",
        choices=["inductor", "aot_eager", "eager"],
        default="inductor",
        help="with --capture-only: what compiles dynamo's graph (eager: the trace alone)",
    )
    parser.add_argument("--cache-dir", type=Path, help="compile cache shared by the configs (default: a new one each)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one config in this process
    args = parser.parse_args(argv)
    if args.single:
        return run_one(args)
    for spec in args.configs:
        try:
            name = parse_config(spec)[0]
        except ValueError as err:
            parser.error(str(err))
        if args.capture_only and not CONFIGS[name][4]:
            parser.error(f"--capture-only captures the whole step of the -graphs configs; {spec!r} is not one")
    if args.capture_only:
        return capture_report(args, sys.argv[1:] if argv is None else argv)
    if args.original and model_hparams(args.preset)["vae"]["image_channels"] != 3:
        parser.error(f"--original runs the original code, which models RGB images only; {args.preset} is not RGB")
    names = (["original"] if args.original else []) + args.configs
    passed = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--allocated-memory"]
    # Rounds over all configs, the original included: a drift in the machine's speed then hits
    # every config alike, and each figure is the median of its rounds. Live tensor memory does not drift:
    # the last round measures it.
    rounds, failed = {name: [] for name in names}, {}
    for i in range(args.repeats):
        last = i == args.repeats - 1
        for name in names:
            result = run_config(name, [*passed, *(["--allocated-memory"] if args.allocated_memory and last else [])])
            if "error" in result:
                failed[name] = result["error"]
                print(f"round {i + 1}/{args.repeats} {name:>16}: failed", flush=True)
                continue
            rounds[name].append(result)
            print(f"round {i + 1}/{args.repeats} {name:>16}: {result['train_images_per_s']:6.2f} img/s", flush=True)
            # Written after every config: a run stopped early keeps what it measured.
            write_report(args, summarize(rounds, names[0]), failed, quiet=True)
    results = summarize(rounds, names[0])
    for name, r in results.items():
        allocated, busy = r.get("allocated_peak_mb"), r.get("gpu_busy_fraction")
        print(
            f"{name:>16}: {r['train_images_per_s']:8.2f} train img/s"
            + (f" ({r[f'speedup_vs_{names[0]}']:.2f}x)" if f"speedup_vs_{names[0]}" in r else "")
            + f", peak {r['peak_memory_mb']:8.0f} MB"
            + (f", allocated peak {allocated:8.0f} MB" if allocated else "")
            + (f", GPU busy {busy:.0%}" if busy is not None else "")
            + (f", first step {r['first_step_s']:.1f} s" if "first_step_s" in r else ""),
            flush=True,
        )
    write_report(args, results, failed)


def summarize(rounds, base_name) -> dict:
    """Each measured config's figures (medians of its rounds so far) and its ratios to `base_name`'s (the
    original when given, else the first config); live tensor memory once every config's last round has it."""
    rounds = {name: runs for name, runs in rounds.items() if runs}
    allocated_memory = all("allocated_peak_mb" in runs[-1] for runs in rounds.values())
    results = {}
    for name, runs in rounds.items():
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[name]["train_images_per_s_rounds"] = [r["train_images_per_s"] for r in runs]
        if allocated_memory:
            results[name]["allocated_peak_mb"] = runs[-1]["allocated_peak_mb"]
    base = results.get(base_name)
    for r in results.values() if base else ():
        r[f"speedup_vs_{base_name}"] = r["train_images_per_s"] / base["train_images_per_s"]
        r[f"memory_vs_{base_name}"] = r["peak_memory_mb"] / base["peak_memory_mb"]
        if allocated_memory:
            r[f"allocated_memory_vs_{base_name}"] = r["allocated_peak_mb"] / base["allocated_peak_mb"]
    return results


def write_report(args, results, failed, quiet=False, **extra):
    """The JSON report: `results`, and under "failed" the error of each config that failed. The final one
    (not `quiet`) ends the bench with an error if any did."""
    if failed:
        extra["failed"] = failed
    report = {
        "preset": args.preset,
        "batch": args.batch,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        **extra,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=1))
    if quiet:
        return
    print(f"wrote {args.out}")
    if failed:
        sys.exit(f"bench configs failed: {', '.join(failed)} (their errors: above, and under 'failed' in {args.out})")


def capture_report(args, passed):
    """--capture-only: each config captured in its own process; their figures, side by side."""
    results, failed = {}, {}
    for spec in args.configs:
        r = run_config(spec, passed, args.cache_dir)
        if "error" in r:
            failed[spec] = r["error"]
            print(f"{spec:>16}: failed", flush=True)
            continue
        results[spec] = r
        compiled = f", {args.capture_backend} compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        print(f"{spec:>16}: trace {r['trace_s']:.1f} s{compiled}, first step {r['first_step_s']:.1f} s", flush=True)
    write_report(args, results, failed, capture_only=True)


if __name__ == "__main__":
    main()
