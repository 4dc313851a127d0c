"""Synthetic linear layers with realistic input structure, for testing and benchmarking solvers.

What is modelled (each a property of real VLM decoder inputs the solvers are sensitive to):
- a few outlier input channels with 10-30x the typical scale (as in LLM residual streams);
- correlated channels (inputs live near a low-dimensional subspace plus isotropic noise);
- vision and text tokens with different channel scales and correlation (different subspaces),
  and more vision than text tokens per sample;
- ``X != X~``: the partly quantized model's inputs deviate from the full-precision ones by a
  structured, input-dependent error ``X = X~ (I + R) + noise`` (what quantized earlier layers do);
- heavy-tailed weights (Student-t) with a per-row scale spread.
Samples are returned explicitly so losses can be computed directly (``||W X~ - Q X||^2``) and the
statistics accumulated exactly as the pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmptq.stats import InputStatistics, StatisticsAccumulator


@dataclass
class SyntheticLayer:
    weight: torch.Tensor  # [N, K]
    x: list[torch.Tensor]  # per sample [T, K]: inputs in the partly quantized model
    x_fp: list[torch.Tensor]  # per sample [T, K]: full-precision model inputs
    vision_mask: list[torch.Tensor]  # per sample bool [T]

    def statistics(self, fp_inputs: bool = True, modality: bool = True) -> InputStatistics:
        acc = StatisticsAccumulator(self.weight.shape[1], self.weight.device, fp_inputs=fp_inputs, modality=modality)
        for x, xf, vm in zip(self.x, self.x_fp, self.vision_mask):
            acc.add(x, xf if fp_inputs else None, vm if modality else None, ~vm if modality else None)
        return acc.finalize()

    def split(self, n_calib: int) -> tuple["SyntheticLayer", "SyntheticLayer"]:
        """(calibration, held-out) layers sharing the weight: the first ``n_calib`` samples and the rest."""
        cal = SyntheticLayer(self.weight, self.x[:n_calib], self.x_fp[:n_calib], self.vision_mask[:n_calib])
        held = SyntheticLayer(self.weight, self.x[n_calib:], self.x_fp[n_calib:], self.vision_mask[n_calib:])
        return cal, held

    def loss_sym(self, q: torch.Tensor) -> float:
        """``sum_s ||X_s W^T - X_s Q^T||^2`` (GPTQ's objective)."""
        w, q = self.weight.double(), q.double()
        return sum(((x.double() @ (w - q).t()) ** 2).sum().item() for x in self.x)

    def loss_asym(self, q: torch.Tensor) -> float:
        """``sum_s ||X~_s W^T - X_s Q^T||^2`` (the asymmetric objective)."""
        w, q = self.weight.double(), q.double()
        return sum(((xf.double() @ w.t() - x.double() @ q.t()) ** 2).sum().item() for x, xf in zip(self.x, self.x_fp))


def _subspace(k: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(rank, k, generator=gen) / rank**0.5


def make_synthetic_layer(
    n: int = 256,
    k: int = 256,
    samples: int = 16,
    vision_tokens: int = 96,
    text_tokens: int = 32,
    seed: int = 0,
    drift: float = 0.08,
    device: str | torch.device = "cpu",
) -> SyntheticLayer:
    """A layer ``W [n, k]`` with ``samples`` calibration samples (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(4, k // 8)
    basis_t, basis_v = _subspace(k, rank, gen), _subspace(k, rank, gen)
    scale_t = torch.exp(0.5 * torch.randn(k, generator=gen))
    scale_v = torch.exp(0.5 * torch.randn(k, generator=gen))
    outliers = torch.randperm(k, generator=gen)[: max(2, k // 64)]
    scale_t[outliers] *= 10 + 20 * torch.rand(len(outliers), generator=gen)
    scale_v[outliers[: len(outliers) // 2]] *= 10  # vision shares only some outliers
    r = drift * torch.randn(k, k, generator=gen) / k**0.5  # structured deviation of X from X~

    def tokens(count: int, basis: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        z = torch.randn(count, basis.shape[0], generator=gen) @ basis + 0.3 * torch.randn(count, k, generator=gen)
        return z * scale

    xs, xfs, masks = [], [], []
    for _ in range(samples):
        xt = tokens(text_tokens, basis_t, scale_t)
        xv = tokens(vision_tokens, basis_v, 0.5 * scale_v)
        perm = torch.randperm(text_tokens + vision_tokens, generator=gen)
        x_fp = torch.cat([xv, xt])[perm]
        vm = torch.cat([torch.ones(vision_tokens, dtype=torch.bool), torch.zeros(text_tokens, dtype=torch.bool)])[perm]
        x = x_fp + x_fp @ r + drift * 0.2 * x_fp.abs().mean() * torch.randn(x_fp.shape, generator=gen)
        xs.append(x.to(device))
        xfs.append(x_fp.to(device))
        masks.append(vm.to(device))
    chi2 = torch.randn(4, n, k, generator=gen).square().sum(0) / 4  # Student-t with 4 dof
    w = torch.randn(n, k, generator=gen) / chi2.sqrt() * 0.02
    w *= torch.exp(0.3 * torch.randn(n, 1, generator=gen))
    return SyntheticLayer(weight=w.to(device), x=xs, x_fp=xfs, vision_mask=masks)


def synthetic_statistics(
    k: int,
    samples: int = 128,
    tokens_per_sample: int = 1024,
    vision_fraction: float = 0.75,
    rank: int = 256,
    drift: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> InputStatistics:
    """Statistics with the structure of :func:`make_synthetic_layer`, built directly at large ``k``.

    Generating tokens for ``k = 18944`` (a 7B model's MLP width) would cost more than the solvers
    being measured, so the expectations are formed in closed form: per-token covariance
    ``C = S (B^T B / r + 0.1 I) S`` for text and vision (different subspaces ``B`` and channel
    scales ``S``, shared outlier channels), ``H = 2 T C`` for ``T`` tokens per sample, and
    ``dXXT = -2 T (R^T C + sigma^2 I)`` for a low-rank drift ``R`` plus noise (``X = X~ + dX``).
    """
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)

    def covariance(scale: torch.Tensor) -> torch.Tensor:
        b = (torch.randn(rank, k, generator=gen) / rank**0.5).to(dev)
        c = b.t() @ b
        c.diagonal().add_(0.1)
        s = scale.to(dev)
        return c * s[:, None] * s[None, :]

    scale_t = torch.exp(0.5 * torch.randn(k, generator=gen))
    scale_v = torch.exp(0.5 * torch.randn(k, generator=gen))
    outliers = torch.randperm(k, generator=gen)[: max(2, k // 64)]
    scale_t[outliers] *= 10
    scale_v[outliers[: len(outliers) // 2]] *= 10
    c_v, c_t = covariance(0.5 * scale_v), covariance(scale_t)
    c = vision_fraction * c_v + (1 - vision_fraction) * c_t
    del c_t
    n_v = int(samples * tokens_per_sample * vision_fraction)
    n_t = samples * tokens_per_sample - n_v
    diag_v = c_v.diagonal().double() * n_v
    diag_t = (c.diagonal().double() * samples * tokens_per_sample - diag_v)
    del c_v
    p = (drift * torch.randn(k, 16, generator=gen) / k**0.25).to(dev)
    q = (torch.randn(k, 16, generator=gen) / k**0.25).to(dev)
    dxxt = -(q @ (p.t() @ c))  # R = p q^T: R^T C = q (p^T C)
    dxxt.diagonal().sub_((drift * 0.2) ** 2 * c.diagonal().mean())
    scale = 2.0 * tokens_per_sample
    return InputStatistics(
        hessian=c.mul_(scale), dxxt=dxxt.mul_(scale), diag_vision_sum=diag_v, diag_text_sum=diag_t,
        n_vision_tokens=n_v, n_text_tokens=n_t, n_samples=samples,
    )


def synthetic_weight(n: int, k: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Heavy-tailed (Student-t, 4 dof) weights with a per-row scale spread, ``[n, k]`` fp32."""
    gen = torch.Generator().manual_seed(seed + 1)
    chi2 = torch.randn(4, n, k, generator=gen).square().sum(0) / 4
    w = torch.randn(n, k, generator=gen) / chi2.sqrt() * 0.02
    w *= torch.exp(0.3 * torch.randn(n, 1, generator=gen))
    return w.to(device)
