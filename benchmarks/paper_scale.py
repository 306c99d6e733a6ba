"""What a row of the paper costs: for stage 1 and every stage-2 model of Tab. 1-3, at the paper's settings (128 px,
--size paper, the big-little DINO encoder, batch 64 / 16 for stage 1, 32 / 8 for stage 2, AMP on GPUs), the
parameters, the FLOPs of one training step (forward + backward, torch.utils.flop_counter with the CPU attention
kernel's formula added), the peak memory (GPU: allocated and reserved under AMP; CPU: the process's, fp32), the time
per step and, on a GPU, steps/s, the model FLOPs utilisation (achieved FLOP/s over the GPU's peak, as nanoGPT reports
it) and the hours for the paper's steps (30,000 for stage 1, 50,000 for stage 2). Plus MSF's stage-1 cost over the
single-scale VQ-VAE's (Sect. 3.4 estimates 1 + 1/4 + 1/16 = 1.31x from the convolutions). And the training loader's
samples/s at the paper's batch with 0 and 4 workers (loader_rate), against what the fastest stage-2 row consumes.

Every row is built by the training scripts' own code from the flags a user would give (train_vae.parse_args +
model_args_of -> msf.build_vae; train_ocl.parse_args + model_args_of -> ocl.OCL) and trained for a few steps on random
inputs of the paper's shapes (the cost of a step does not depend on what the pixels show), each row in a process of
its own so that its peak memory is its own. DINO is the random stand-in (its cost is the real ViT-S/8's).

Run: python benchmarks/paper_scale.py                       # every row, CPU: a few minutes per stage-2 row
     python benchmarks/paper_scale.py --device cuda --steps 20 --json results/paper_scale_h200.json
     python benchmarks/paper_scale.py --rows slate,dinosaur --batch-scale 0.25   # a quick look
     python benchmarks/paper_scale.py --device cuda --compile                    # and torch.compile against eager
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import msf  # noqa: E402
import ocl  # noqa: E402
import train_common  # noqa: E402
import train_ocl  # noqa: E402
import train_vae  # noqa: E402
import vae  # noqa: E402

# name: (what it is, stage, the flags a user gives; stage 2: the code dimension of its frozen MSF VAE, None = no VAE)
ROWS = {
    "vqvae": ("stage 1: VQ-VAE, c 256 (SLATE's guidance)", 1, ["--dataset", "coco", "--vae", "vqvae"], None),
    "msf": ("stage 1: MSF VAE, c 256", 1, ["--dataset", "coco"], None),
    "msf-c4": ("stage 1: MSF VAE, c 4 (SlotDiffusion's)", 1, ["--dataset", "coco", "--code-dim", "4"], None),
    "msf-video": ("stage 1: MSF VAE on MOVi frames", 1, ["--dataset", "movi_c"], None),
    "slate": ("SLATE + MSF (Tab. 1)", 2, ["--dataset", "coco", "--decoder", "transformer"], 256),
    "slotdiffusion": ("SlotDiffusion + MSF (Tab. 1)", 2, ["--dataset", "coco", "--decoder", "diffusion"], 4),
    "dinosaur": ("DINOSAUR (Tab. 3)", 2, ["--dataset", "coco", "--decoder", "mlp"], None),
    "steve": ("STEVE + MSF (Tab. 2)", 2, ["--dataset", "movi_c", "--decoder", "transformer"], 256),
    "video-slotdiffusion": ("video SlotDiffusion + MSF (Tab. 2)", 2, ["--dataset", "movi_c", "--decoder", "diffusion"], 4),
}
PAPER_STEPS = {1: 30_000, 2: 50_000}  # A.5: VAE pretraining 30,000 iterations, OCL training 50,000


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)  # 2 * b * heads * (n q . k + n v) products, as the CUDA kernels count


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP counter knows the CUDA kernels of F.scaled_dot_product_attention but not the CPU one, which it would
# count as 0 FLOPs: its formulas, given for the CPU kernel and its backward too
ATTENTION = {op: f for op, f in ((getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),
                                  _cpu_attention),
                                 (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
                                  _cpu_attention_backward)) if op is not None}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "V100": 125.0}  # dense fp16


def build(name, batch_scale):
    """(model, trainable parameters, one training step's inputs as a function, lr, clip, batch, stage)."""
    _, stage, flags, code_dim = ROWS[name]
    if stage == 1:
        args = train_vae.parse_args(flags)
        model = msf.build_vae(**train_vae.model_args_of(args))
        batch = max(1, round(args.batch_size * batch_scale))
        frames = args.clip_frames if ROWS[name][2][1].startswith("movi") else 1  # a video VAE: clip frames per clip
        images = batch * frames  # data.video_frames flattens each clip's frames into the batch

        def inputs():  # tau = alpha = 0.5: mid-way through GDR's annealing, Gumbel sampling on
            return {"image": torch.rand(images, 3, args.resolution, args.resolution) * 2 - 1, "tau": 0.5, "alpha": 0.5}
        return model, list(model.parameters()), inputs, args.lr, args.clip, batch, stage
    extra = ["--dino-weights", "random"] if name not in ("steve", "video-slotdiffusion") else []
    args = train_ocl.parse_args(flags + extra)
    vae = None
    if code_dim is not None:  # the frozen guidance: an MSF VAE of the code dimension the decoder is designed for
        vae = msf.build_vae(**train_vae.model_args_of(train_vae.parse_args(["--dataset", args.dataset, "--code-dim",
                                                                              str(code_dim)])))
    model_args = train_ocl.model_args_of(args, 128)
    dino = None
    if args.encoder == "dino":
        dino, model_args["dino_sha256"] = ocl.load_dino("random")
    model = ocl.OCL(vae, **model_args, dino=dino)
    batch = max(1, round(args.batch_size * batch_scale))
    frames = args.clip_frames if model.video else 1

    def inputs():
        if not model.video:
            return {"image": torch.rand(batch, 3, 128, 128) * 2 - 1, "sigma": 0.5}
        corner = torch.rand(batch, frames, 3, 2) * 0.6  # 3 objects per clip, boxes (x0, y0, x1, y1) in [0, 1]
        bbox = torch.cat([corner, corner + 0.1 + torch.rand(batch, frames, 3, 2) * 0.3], -1)  # (b, t, 3, 4)
        return {"image": torch.rand(batch, frames, 3, 128, 128) * 2 - 1, "sigma": 0.5, "bbox": bbox}
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, inputs, args.lr, args.clip, batch, stage


def measure(name, device, steps, batch_scale, compile=False):
    """One row, in this process: returns a dict of what the table shows. compile: also time the step under
    torch.compile (what --compile does), after the eager steps, on the same model."""
    torch.manual_seed(0)
    model, params, inputs, lr, clip, batch, stage = build(name, batch_scale)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(params, lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def step():
        x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs().items()}
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = model(**x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocations, cuDNN's choices, the latent scale, the codebooks' data init
    with FlopCounterMode(display=False, custom_mapping=ATTENTION) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    reserved = {"reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30} if device.type == "cuda" else {}
    compiled = None
    if compile:  # the same steps with the parts training compiles (train_common.compile_model), in place: the first
        train_common.compile_model(model)  # two compile (and recompile once for the query noise), then the timed ones
        start = time.perf_counter()
        step()
        step()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        compiled = {"s_step_compiled": statistics.median(times), "compile_s": compile_s}
    codebook = vae.count_codebook_params(model) if stage == 1 else 0  # Sect. 3.4's "codebook-related parameters"
    return {"row": name, "what": ROWS[name][0], "stage": stage, "batch": batch, "device": str(device),
            "params_trained": sum(p.numel() for p in params), "params_all": sum(p.numel() for p in model.parameters()),
            "codebook_params": codebook, "gflops_step": flops / 1e9, "peak_gib": peak / 2 ** 30,
            "s_step": seconds, "steps": steps, "paper_steps": PAPER_STEPS[stage], "video": "movi" in ROWS[name][2][1],
            **reserved,
            **(compiled or {})}


def loader_rate(kind, workers, batch, batches=8):
    """Samples/s of the training loader as both scripts read (train_common.infinite_batches: shuffled LMDB records,
    decoded to float tensors) at the paper's batch: `kind` "images" = 128 px images (stage 2 on COCO, ClevrTex, VOC)
    or "clips" = 24-frame clips of 128 px (MOVi). The records are the built-in generator's, written at 128 px in a
    temporary folder: the same record format and bytes per sample as a conversion's (image + segment, clips + boxes).
    The first batch (workers starting) is not timed."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        count = batch * (batches + 1)
        if kind == "images":
            folder = data.write_shapes(tmp, 128, counts={"train": count, "val": 1}, quiet=True)
        else:
            folder = data.write_shapes_video(tmp, 128, counts={"train": count, "val": 1}, frames=24, quiet=True)
        dataset = data.LMDBDataset(Path(folder) / "train")
        stream = train_common.infinite_batches(dataset, batch, seed=0, workers=workers)
        next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        seconds = time.perf_counter() - start
        del stream  # its workers end with it
        data.close_env(Path(folder) / "train")
    return batches * batch / seconds


def gpu_peak_tflops(device, given):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def table(rows, peak_tflops, loaders=None):
    """The markdown table of the measured rows."""
    gpu = rows[0]["device"].startswith("cuda")
    # what the memory column is: on a GPU, torch's peaks of allocated and reserved memory under AMP (what the run
    # needs, and what its allocator holds); on a CPU, the process's peak resident memory (fp32, no AMP there)
    memory = "peak GPU memory under AMP, allocated / reserved (GiB)" if gpu else "peak process memory, fp32 (GiB)"
    head = ["row", "batch", "trained params (M)", "GFLOP / step", memory, "s / step"]
    head += ["steps / s", "MFU", "hours for the paper's steps"] if gpu else ["hours for the paper's steps (this CPU)"]
    head += ["--compile: time per step over eager"] if "s_step_compiled" in rows[0] else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" + (f" / {r['reserved_gib']:.1f}" if "reserved_gib" in r else "")
        cells = [r["what"], str(r["batch"]), f"{r['params_trained'] / 1e6:.2f}", f"{r['gflops_step']:,.0f}", peak,
                 f"{r['s_step']:.3f}"]
        hours = r["paper_steps"] * r["s_step"] / 3600
        if gpu:
            mfu = r["gflops_step"] / r["s_step"] / (peak_tflops * 1e3) if peak_tflops else None
            cells += [f"{1 / r['s_step']:.2f}", f"{100 * mfu:.1f}%" if mfu is not None else "?"]
        cells.append(f"{hours:,.1f} ({r['paper_steps']:,} steps)")
        if "s_step_compiled" in r:
            cells.append(f"{r['s_step_compiled'] / r['s_step']:.2f}x ({r['compile_s']:.0f} s to compile)")
        lines.append("| " + " | ".join(cells) + " |")
    for kind, rate in (loaders or {}).items():  # can the loader feed the fastest row that reads this kind of input?
        video = kind == "clips"
        need = max((r["batch"] / r["s_step"] for r in rows if r["stage"] == 2 and r["video"] == video), default=None)
        lines.append(f"\nLoader, {kind} at the paper's batch: " + ", ".join(f"{n} workers {v:,.0f} samples/s"
                                                                          for n, v in rate.items())
                     + (f"; the fastest stage-2 row on {kind} consumes {need:,.2f} samples/s" if need else ""))
    by = {r["row"]: r for r in rows}
    if "vqvae" in by and "msf" in by:
        lines.append(f"\nMSF's stage 1 over the VQ-VAE's: {by['msf']['gflops_step'] / by['vqvae']['gflops_step']:.2f}x the "
                     f"FLOPs, {by['msf']['s_step'] / by['vqvae']['s_step']:.2f}x the time per step, "
                     f"{by['msf']['peak_gib'] / by['vqvae']['peak_gib']:.2f}x the peak memory (Sect. 3.4: about 1.31x); "
                     f"codebook-related parameters {by['msf']['codebook_params'] / 1e6:.3f}M against "
                     f"{by['vqvae']['codebook_params'] / 1e6:.3f}M (Sect. 3.4: 0.196M against 1.048M)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--steps", type=lambda v: max(1, int(v)), default=3,
                   help="timed steps per row, at least 1 (after one warm-up and one counted step)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="the paper's batch times this (a quick look: 0.25)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense fp16 peak for MFU (default: known for H100/H200/A100/L40S/4090/V100)")
    p.add_argument("--compile", action="store_true", help="also time each row under torch.compile (--compile)")
    p.add_argument("--loader-workers", default="0,4",
                   help="DataLoader workers to time the loader with, comma-separated ('' = skip the loader)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = p.parse_args()
    device = torch.device(args.device)
    if args.row:  # the child: one row, one JSON line
        print(json.dumps(measure(args.row, device, args.steps, args.batch_scale, args.compile)))
        return
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{machine} | torch {torch.__version__} | batch x {args.batch_scale:g} | {args.steps} timed steps per row",
          flush=True)
    rows = []
    for name in names:
        done = subprocess.run([sys.executable, __file__, "--row", name, "--device", args.device, "--steps",
                               str(args.steps), "--batch-scale", str(args.batch_scale),
                               *(["--compile"] if args.compile else [])], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name}: {r['s_step']:.3f} s/step, {r['gflops_step']:,.0f} GFLOP/step, {r['peak_gib']:.1f} GiB"
              + (f", compiled {r['s_step_compiled']:.3f} s/step" if "s_step_compiled" in r else ""), flush=True)
    if not rows:
        sys.exit("no row was measured (each row's failure is named above)")
    loaders = {}
    for kind, batch in (("images", 32), ("clips", 8)):  # stage 2's paper batches (A.5)
        if args.loader_workers and any(r["stage"] == 2 and r["video"] == (kind == "clips") for r in rows):
            loaders[kind] = {int(n): loader_rate(kind, int(n), max(1, round(batch * args.batch_scale)))
                             for n in args.loader_workers.split(",")}
    print(table(rows, gpu_peak_tflops(device, args.peak_tflops), loaders))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows,
                                               "loader_samples_per_s": loaders}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
