#!/usr/bin/env python3
"""Stage-1 training steps of the reference in PyTorch, for the speed ratio
against `frankensplit train` on the same GPU (BENCHMARKS.md).

The reference's modules are rebuilt as in tools/fixtures/gen_model_fixtures.py
(timm 0.6's Swin blocks); the teacher is timm's swin_s3_base_224 up to
layers.1 (random weights: speed only). The EntropyBottleneck is CompressAI's
when importable, else the same computation written out below. Inputs are
random tensors already on the GPU, so this times the model alone (an upper
bound for PyTorch; the Rust run also decodes and augments images).

    TIMM_OLD=/path/to/timm-0.6.13 python3 tools/bench/train_torch.py --steps 60 --batch 16 [--amp]
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
    args = ap.parse_args()
    device = "cuda"
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

    def head(x):
        x = teacher.patch_embed(x)
        x = teacher.layers[1](teacher.layers[0](x))
        return x

    def step():
        with torch.no_grad(), torch.autocast("cuda", enabled=args.amp):
            h = head(x)
        with torch.autocast("cuda", enabled=args.amp):
            y = g_a(x)
            y_hat, lik = eb(y)
            h_tilde = g_s(y_hat)
        loss = F.mse_loss(h_tilde.float(), h.float(), reduction="sum") + args.lmbda * (-torch.log2(lik.float())).sum()
        opt.zero_grad()
        eb.aux_loss().backward() if hasattr(eb, "aux_loss") else eb.loss().backward()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"framework": "pytorch " + torch.__version__, "entropy_bottleneck": eb_name,
                      "amp": args.amp, "batch": args.batch, "steps": args.steps,
                      "images_per_s": args.steps * args.batch / seconds,
                      "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
