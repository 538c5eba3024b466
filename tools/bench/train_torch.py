#!/usr/bin/env python3
"""Stage-1 training steps of the reference in PyTorch, for the speed ratio
against `frankensplit train` on the same GPU or CPU (BENCHMARKS.md).

The reference's modules are rebuilt as in tools/fixtures/gen_model_fixtures.py
(timm 0.6's Swin blocks); the teacher is timm's swin_s3_base_224 up to
layers.1 (random weights: speed only). The EntropyBottleneck is CompressAI's
when importable, else the same computation written out below. Inputs are
random tensors already on the device, so this times the model alone (an upper
bound for PyTorch; the Rust run also decodes and augments images, on its
loader threads, outside its timed steps). tools/bench/train_cpu.sh runs it on
the CPU against `frankensplit train`.

    TIMM_OLD=/path/to/timm-0.6.13 python3 tools/bench/train_torch.py --steps 60 --batch 16 [--amp]
    TIMM_OLD=... python3 tools/bench/train_torch.py --device cpu --threads 2 --steps 15 --warmup 3 --batch 4 --phases

`--phases` also times the step's phases (teacher forward, compressor forward,
loss, backward, optimiser; on a GPU each boundary synchronises, which slows
the step, so the images/s of such a run is not the headline number).
`--stage 2` adds the saliency weighting of the distortion (a random map per
image, nearest-resized to the token grid, as `frankensplit train` does with
saved maps).
"""

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the fixture module imports safetensors, which timing does not need
    import safetensors.torch  # noqa: F401
except ImportError:
    import types
    stub = types.ModuleType("safetensors.torch")
    stub.load_file = stub.save_file = None
    sys.modules["safetensors"] = types.ModuleType("safetensors")
    sys.modules["safetensors.torch"] = stub
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "fixtures"))
from gen_model_fixtures import Decoder, Encoder, old_timm  # noqa: E402


class LowerBound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad):
        x, bound = ctx.saved_tensors
        pass_through = (x >= bound) | (grad < 0)
        return pass_through * grad, None


class FactorizedEB(nn.Module):
    """CompressAI's EntropyBottleneck forward (filters (3,3,3,3), init_scale 10)."""

    def __init__(self, channels, filters=(3, 3, 3, 3), init_scale=10.0):
        super().__init__()
        f = (1,) + filters + (1,)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices, self.biases, self.factors = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for i in range(len(filters) + 1):
            init = torch.log(torch.expm1(torch.tensor(1 / scale / f[i + 1])))
            self.matrices.append(nn.Parameter(torch.full((channels, f[i + 1], f[i]), float(init))))
            self.biases.append(nn.Parameter(torch.rand(channels, f[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, f[i + 1], 1)))
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0, init_scale]).repeat(channels, 1, 1))
        self.register_buffer("target", torch.tensor([-20.7233, 0.0, 20.7233]))
        self.register_buffer("bound", torch.tensor([1e-9]))

    def logits(self, x, stop_gradient):
        for i, m in enumerate(self.matrices):
            m, b = F.softplus(m), self.biases[i]
            if stop_gradient:
                m, b = m.detach(), b.detach()
            x = torch.matmul(m, x) + b
            if i < len(self.factors):
                fac = self.factors[i].detach() if stop_gradient else self.factors[i]
                x = x + torch.tanh(fac) * torch.tanh(x)
        return x

    def aux_loss(self):
        return torch.abs(self.logits(self.quantiles, True) - self.target).sum()

    def forward(self, y):
        c = y.shape[1]
        v = y.transpose(0, 1).reshape(c, 1, -1)
        v = v + torch.empty_like(v).uniform_(-0.5, 0.5)
        lower, upper = self.logits(v - 0.5, False), self.logits(v + 0.5, False)
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        lik = LowerBound.apply(lik, self.bound)
        shape = (c, y.shape[0]) + y.shape[2:]
        back = lambda t: t.reshape(shape).transpose(0, 1)
        return back(v), back(lik)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lmbda", type=float, default=0.064)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--phases", action="store_true", help="also report the mean seconds of each phase of a step")
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2))
    args = ap.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timm, st = old_timm()
    teacher = timm.create_model("swin_s3_base_224", pretrained=False).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    c = dict(input_size=224, latent=48, decoder_dim=96, decoder_heads=3, recon_dim=192, recon_heads=4,
             target_dim=384, window=7)
    try:
        from compressai.entropy_models import EntropyBottleneck
        eb, eb_name = EntropyBottleneck(48), "compressai"
    except Exception:  # noqa: BLE001 - fall back to the written-out computation
        eb, eb_name = FactorizedEB(48), "written out"
    g_a, g_s = Encoder((48, 64), 48).to(device), Decoder(st, c).to(device)
    eb = eb.to(device)
    params = list(g_a.parameters()) + list(g_s.parameters()) + list(eb.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    saliency = torch.rand(args.batch, 1, 28, 28, device=device) if args.stage == 2 else None
    phases = {}

    def mark(name, since):
        if not args.phases:
            return since
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - since
        return now

    def head(x):
        x = teacher.patch_embed(x)
        x = teacher.layers[1](teacher.layers[0](x))
        return x

    def step():
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.split(":")[0], enabled=args.amp):
            h = head(x)
        t = mark("teacher_forward", t)
        with torch.autocast(device.split(":")[0], enabled=args.amp):
            y = g_a(x)
            y_hat, lik = eb(y)
            h_tilde = g_s(y_hat)
        t = mark("compressor_forward", t)
        if saliency is not None:
            d = (h_tilde.float() - h.float()).square()
            side = int(round(d.shape[1] ** 0.5))
            s = F.interpolate(saliency, size=(side, side), mode="nearest").view(d.shape[0], -1, 1)
            distortion = (d + d * s).sum() / 2
        else:
            distortion = F.mse_loss(h_tilde.float(), h.float(), reduction="sum")
        loss = distortion + args.lmbda * (-torch.log2(lik.float())).sum()
        t = mark("loss", t)
        opt.zero_grad()
        eb.aux_loss().backward() if hasattr(eb, "aux_loss") else eb.loss().backward()
        loss.backward()
        t = mark("backward", t)
        opt.step()
        mark("optimizer", t)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    phases.clear()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    out = {"framework": "pytorch " + torch.__version__, "entropy_bottleneck": eb_name, "stage": args.stage,
           "amp": args.amp, "batch": args.batch, "steps": args.steps,
           "images_per_s": args.steps * args.batch / seconds,
           "device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"}
    if args.phases:
        out["phase_ms"] = {k: round(1e3 * v / args.steps, 1) for k, v in phases.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
