"""VCAS, the baseline of issue 22: a port of "Efficient Backpropagation with Variance-Controlled
Adaptive Sampling" (Wang, Chen & Zhu, ICLR 2024) for the experiments' models, in eager PyTorch.

Followed: https://github.com/thu-ml/VCAS at commit 0bc7d0875de8098da53537af066a9f1921d16409
(2024-03-08), read, not copied:

* ``vcas/layers/act_sampler.py``: ``sampling.backward`` and ``ActSampler`` (SampleA, here
  :meth:`VCAS.activation_backward`); ``Sequential`` (the sampler at each block's output);
* ``vcas/layers/linear.py``: ``linear.backward`` and ``Linear`` (SampleW and the variance probes,
  here :meth:`VCAS.linear_backward`);
* ``vcas/layers/utils.py``: ``soft_topk`` (:func:`keep_probabilities`), ``leverage_k``
  (:meth:`VCAS.sampled_weight_grad`), ``cal_leverage_var`` (:func:`weight_sampling_variance`),
  ``find_top_sum`` (:func:`top_fraction`);
* ``vcas/sample_scheme.py``: ``VcasSampleScheme.register_linear``, ``calculate``, ``update`` and
  ``reset`` (:meth:`VCAS.measure`, :meth:`VCAS.update`);
* ``vcas/vcas_trainer.py``: ``VcasTrainer.training_step`` (the cadence and the passes of a
  measurement, :meth:`VCAS.step`);
* ``vcas/model_processor.py``: ``VcasModelProcessor`` (which layers are swapped, :func:`wrap`);
* ``vcas/sample_args.py``: ``VcasSampleArguments`` (the defaults, :class:`VCASConfig`); README.md
  (the cadence advice).

What VCAS does. Every nn.Linear inside a block (BERT's ``BertLayer``; here a transformer ``Block``,
or each hidden Linear of an MLP) is swapped for one whose backward VCAS controls, and a sampler sits
at each block's output. In the backward:

* SampleA (activation gradient, data dimension): at block ``l``'s output each sample ``i`` of the
  batch is kept with probability ``p_i = min(1, c ||g_i||)``, ``c`` such that ``sum p_i = int(N
  rho_l)`` (:func:`keep_probabilities`: the probabilities minimising the added variance ``sum (1/p_i
  - 1) ||g_i||^2`` at that expected count), independently, and scaled by ``1 / p_i``; the others
  are zeroed. Unbiased: the keep indicator ``m_i`` has ``E[m_i] = p_i``. The ratios ``rho_l``
  never decrease towards the output, so the top block samples first and a lower block samples
  again (among the samples still kept) only where its ratio is smaller; a zeroed sample stays zero
  below, and the swapped Linear layers compute the activation gradient on the kept samples only.
* SampleW (weight gradient, token dimension): ``grad W = sum_t g_t x_tᵀ`` over the kept samples'
  tokens is estimated by keeping token ``t`` with ``p_t = min(1, c ||g_t|| ||x_t||)`` (leverage
  scores), ``sum p_t = int(T nu)``, each kept term scaled by ``1 / p_t``: unbiased, its added
  variance ``sum (1/p_t - 1) ||g_t||^2 ||x_t||^2`` (:func:`weight_sampling_variance`). The bias
  gradient is the exact one of the sampled activation gradient.
* The controller (every ``every`` steps, before the step, on ``repeats`` = m fresh batches): per
  batch one exact backward and m backwards with SampleA only. On a random 1% of each layer's
  weight entries (new each time) it measures the SGD variance (the sample variance of the exact
  gradients over the m batches), the activation-sampling variance (mean squared distance of the
  SampleA gradients from the batch's exact one) and the weight-sampling variance (the formula
  above, given the SampleA gradients); the exact passes also give, per block, the fraction of the
  samples, largest gradient norms first, that holds a share ``s -+ s_step`` of the norms' sum
  (:func:`top_fraction`). Rule (:meth:`VCAS.update`): if the activation variance summed over the
  layers exceeds ``act_tau`` times the summed SGD variance, ``s += s_step`` (at most 1), else ``s
  -= s_step`` (at least 0); the new ratios are the fractions measured at the old ``s - s_step``
  after an increase and at ``s + s_step`` after a decrease (that pairing is the code's,
  ``act_ratio_up_sched``/``act_ratio_down_sched``, reproduced as is), made non-decreasing towards
  the output, then ``rho_l = 0.6 rho_l + 0.4 new_l``. Per layer, ``nu /= 0.95`` if its weight
  variance exceeds ``w_tau`` times its SGD variance, else ``nu *= 0.95`` (no clamp; ``nu >= 1``
  computes exactly). Every step until the first measurement is exact; all ratios start at 1.

Where the port departs from the code, and why:

* The sampled passes of a measurement draw independently; VCAS reseeds each of a batch's m repeats
  with ``set_seed(i)`` (which lines its dropout up with the exact pass, and makes the m draws
  identical). These models have no dropout; independent draws only make the estimate less noisy.
* Draws come from the controller's own generator (VCAS uses torch's and restores it after a
  measurement); the measurement batches come from their own stream of the training data (VCAS
  cycles a second iterator over the training loader), so training sees the exact run's batches.
* When SampleA happens to keep no sample (probability at most ``e^-k``) the gradient is zero, as the
  estimator says; VCAS returns the unsampled gradient then, a bias. A block keeps at least one
  sample in expectation (``k >= 1``), VCAS's ``int(N rho)`` could round to 0 (never at its ratios).
* The probes are scaled by ``entries / probes`` (VCAS divides by the 1% fraction), at least one
  probe per layer, and the rule compares ``var > tau * sgd_var`` (no division by a zero variance).
* A layer whose input needs no gradient (the MLP's first) skips the input-gradient GEMM, as the
  exact backward does; VCAS computes and drops it.
* The blocks: the ViT's and GPT's transformer blocks stand for ``BertLayer`` (their Linear layers
  swapped, the head, the patch convolution, embeddings and attention's batched matmuls left to
  autograd, exact on the sampled gradient, as VCAS leaves BERT's pooler, classifier and attention
  matmuls); the MLP has no blocks, so each hidden Linear is one (its sampler at its output) and the
  classifier stays exact.
* The cadence: VCAS's default is 100 steps, its README asks for at least 50 measurements in a run;
  ``examples/experiment.py`` measures every ``min(100, steps // 50)`` steps (at least 1).

It runs eagerly, as VCAS does: the backward reads the controller's ratios and keeps a
data-dependent set of samples, which a graph traced once would freeze (and Dynamo breaks the graph
at these functions anyway: 13 graphs for a 2-block ViT).

FLOPs: each backward pass, the training steps' and the measurements', costs the exact backward's
GEMM and convolution FLOPs (as ``examples/experiment.py`` counts them) less what the swapped layers
skip: ``2 c_in c_out`` per token dropped from an input-gradient or weight-gradient GEMM. Products
left to autograd (attention's matmuls, the patch convolution, the head) count at their exact cost:
autograd computes them on the whole batch, zeroed samples included. The measurements' extra
forward passes are counted in :meth:`VCAS.record`, not in the backward FLOPs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ubcompile.sketches.norm import water_fill

Batch = tuple[Tensor, Tensor]


@dataclasses.dataclass(frozen=True)
class VCASConfig:
    """VCAS's hyperparameters at its defaults (``VcasSampleArguments``; its names in comments)."""

    act_tau: float = 0.025  # act_var_tau: activation variance allowed, relative to the SGD variance
    w_tau: float = 0.025  # w_var_tau: weight variance allowed, per layer
    every: int = 100  # cal_var_freq: steps between measurements
    s_step: float = 0.01  # s_update_step
    w_mul: float = 0.95  # w_ratio_mul
    repeats: int = 2  # cal_var_m: batches per measurement, and SampleA draws per batch
    act_decay: float = 0.6  # act_sched_decay: EMA of the activation ratios
    probe_fraction: float = 0.01  # param_sample_ratio: weight entries probed per layer


def keep_probabilities(scores: Tensor, k: int) -> Tensor:
    """``p_i = min(1, c scores_i)`` with ``sum p_i = k`` (zero scores get 0): ubcompile's
    :func:`~ubcompile.sketches.norm.water_fill`, which is VCAS's ``soft_topk``; all ones for ``k`` at
    least the count.

    Keeping item ``i`` with probability ``p_i`` and scaling it by ``1 / p_i`` is unbiased; these
    ``p`` minimise the added variance ``sum (1/p_i - 1) scores_i^2`` for ``k`` items expected.
    """
    return torch.ones_like(scores) if k >= len(scores) else water_fill(scores, k).to(scores.dtype)


def weight_sampling_variance(g: Tensor, x: Tensor, ratio: float) -> float:
    """Variance (summed over the entries) that SampleW at ``ratio`` adds to ``gᵀ x``, given ``g``
    and ``x`` (tokens along dim 0): ``sum_t (1/p_t - 1) ||g_t||^2 ||x_t||^2``. Infinite below one
    token (VCAS then computes exactly but reports about ``1e9 sum_t ||g_t||^2 ||x_t||^2``)."""
    k = int(len(g) * ratio)
    if k == 0:
        return float("inf")
    sq = g.square().sum(1) * x.square().sum(1)
    p = keep_probabilities(sq.sqrt(), k)
    return float(torch.where(p > 0, (1 / p - 1) * sq, 0.0).sum())


def top_fraction(norms: Tensor, share: float) -> float:
    """The least fraction of the samples, largest norms first, whose norms sum to ``share`` of the
    total (one more than those whose running sum stays below it), at most 1."""
    top = norms.sort(descending=True).values
    return min((int((top.cumsum(0) < share * top.sum()).sum()) + 1) / len(top), 1.0)


@dataclasses.dataclass
class Measurement:
    """One measurement. Per swapped Linear layer, summed over its weight's entries: the SGD
    variance of its gradient, the variance SampleA adds, the variance SampleW adds. Per block: the
    ratio :func:`top_fraction` gives at ``s - s_step`` and at ``s + s_step``."""

    sgd_var: list[float]
    act_var: list[float]
    w_var: list[float]
    ratios_below: list[float]  # VCAS's act_ratio_up_sched
    ratios_above: list[float]  # VCAS's act_ratio_down_sched


@dataclasses.dataclass
class _Tally:
    """What a measurement's backward passes gather (per layer, per block)."""

    exact: list[list[Tensor]]  # each exact pass's probed weight-gradient entries
    act_dev: list[float]  # summed squared distance of the SampleA probes from the exact ones
    w_var: list[float]
    below: list[float]
    above: list[float]


class VCAS:
    """The controller (VCAS's sample scheme and the part of its trainer that measures): ratios,
    the backward of the swapped layers, the measurement and the update. Build it with :func:`wrap`."""

    def __init__(self, model: nn.Module, config: VCASConfig, exact_flops: float, seed: int, device: torch.device):
        self.model, self.config, self.exact_flops = model, config, exact_flops
        self.generator = torch.Generator(device).manual_seed(seed)
        self.s = 1.0
        self.act_ratios: list[float] = []  # per block, in forward order
        self.w_ratios: list[float] = []  # per swapped Linear layer
        self.shapes: list[int] = []  # weight entries per layer
        self.probes: list[Tensor] = []
        self.sampling = False  # VCAS's scheme.sample: off until the first measurement
        self.tally: Optional[_Tally] = None  # gathering a measurement (VCAS's scheme.cal_var)
        self.kept: Optional[Tensor] = None  # samples kept by the last SampleA (nonzero_data_index)
        self.steps = self.passes = self.forward_passes = 0
        self.saved_flops = 0.0
        self.measurement_flops = 0.0  # the part of spent_flops that measurements cost
        self.history: list[dict[str, Any]] = []

    # the backward of the swapped layers

    def _draw(self, p: Tensor) -> Tensor:
        return torch.rand(p.shape, generator=self.generator, device=p.device) < p

    def activation_backward(self, block: int, g: Tensor) -> Tensor:
        """SampleA at ``block``'s output: ``g`` with each sample kept with probability ``p_i``
        (:func:`keep_probabilities` of the samples' gradient norms, ``int(N rho)`` expected) and
        scaled by ``1 / p_i``, the others zeroed; records the kept samples. Unbiased. In an exact
        pass of a measurement it records :func:`top_fraction` at ``s -+ s_step`` instead."""
        if not self.sampling:
            if self.tally is not None:
                norms = g.flatten(1).norm(dim=1)
                self.tally.below[block] += top_fraction(norms, self.s - self.config.s_step)
                self.tally.above[block] += top_fraction(norms, self.s + self.config.s_step)
            return g
        top = block == len(self.act_ratios) - 1
        if not (top or self.act_ratios[block] < self.act_ratios[block + 1]):
            return g  # the same ratio as the block above: its samples
        p = keep_probabilities(g.flatten(1).norm(dim=1), max(1, int(len(g) * self.act_ratios[block])))
        keep = self._draw(p)
        self.kept = keep.nonzero().squeeze(1)
        return g * torch.where(keep, 1 / p, 0.0).to(g.dtype).view(-1, *[1] * (g.dim() - 1))

    def sampled_weight_grad(self, g: Tensor, x: Tensor, ratio: float) -> tuple[Tensor, int]:
        """SampleW: ``gᵀ x`` (tokens along dim 0) from the tokens kept with probability ``p_t``
        (:func:`keep_probabilities` of ``||g_t|| ||x_t||``, ``int(T ratio)`` expected), each scaled
        by ``1 / p_t``: unbiased. Exact when that count is 0 or all tokens. Returns the estimate and
        the tokens its GEMM used."""
        k = int(len(g) * ratio)
        if k == 0 or k >= len(g):
            return g.T @ x, len(g)
        p = keep_probabilities(g.norm(dim=1) * x.norm(dim=1), k)
        kept = self._draw(p).nonzero().squeeze(1)
        return (g[kept] / p[kept, None]).T @ x[kept], len(kept)

    def linear_backward(self, layer: int, x: Tensor, weight: Tensor, g: Tensor,
                        need_input_grad: bool) -> tuple[Optional[Tensor], Tensor]:
        """Input and weight gradients of swapped Linear ``layer``. Exact when not sampling; else on
        the samples SampleA kept (the others' gradient is zero): the input gradient exactly, the
        weight gradient by SampleW, or exactly in a measurement's SampleA pass (whose probes and
        SampleW variance it records). Counts the FLOPs the GEMMs skip."""
        c_out, c_in = weight.shape
        if not self.sampling:
            g2, x2 = g.reshape(-1, c_out), x.reshape(-1, c_in)
            gw = g2.T @ x2
            if self.tally is not None:
                self.tally.exact[layer].append(gw.flatten()[self.probes[layer]])
            return ((g2 @ weight).view_as(x) if need_input_grad else None), gw
        gk, xk = g.index_select(0, self.kept), x.index_select(0, self.kept)
        g2, x2 = gk.reshape(-1, c_out), xk.reshape(-1, c_in)
        gx = torch.zeros_like(x).index_copy_(0, self.kept, (g2 @ weight).view_as(xk)) if need_input_grad else None
        if self.tally is None:
            gw, w_tokens = self.sampled_weight_grad(g2, x2, self.w_ratios[layer])
        else:
            gw, w_tokens = g2.T @ x2, len(g2)
            exact = self.tally.exact[layer][-1]
            self.tally.act_dev[layer] += float((gw.flatten()[self.probes[layer]] - exact).square().sum())
            self.tally.w_var[layer] += weight_sampling_variance(g2, x2, self.w_ratios[layer])
        tokens = g.numel() // c_out
        self.saved_flops += 2 * c_in * c_out * ((tokens - len(g2)) * need_input_grad + tokens - w_tokens)
        return gx, gw

    # the controller

    def _new_probes(self) -> None:
        self.probes = [torch.randperm(n, generator=self.generator, device=self.generator.device)
                       [:max(1, int(n * self.config.probe_fraction))] for n in self.shapes]

    def _backward(self, loss: Tensor) -> None:
        torch.autograd.grad(loss, [p for p in self.model.parameters() if p.requires_grad])

    def measure(self, loss_of: Callable[[Batch], Tensor], batches: Iterator[Batch]) -> Measurement:
        """VCAS's measurement: for each of ``repeats`` (m) batches from ``batches``, one exact
        backward of ``loss_of(batch)`` and m with SampleA only; the estimates (unbiased, the SGD
        variance with Bessel's correction) scaled from the probes to every weight entry."""
        m, layers, blocks = self.config.repeats, len(self.w_ratios), len(self.act_ratios)
        self.tally = _Tally([[] for _ in range(layers)], [0.0] * layers, [0.0] * layers, [0.0] * blocks, [0.0] * blocks)
        for _ in range(m):
            batch = next(batches)
            self.sampling = False
            self._backward(loss_of(batch))
            self.sampling = True
            for _ in range(m):
                self._backward(loss_of(batch))
        tally, self.tally = self.tally, None
        self.passes += m + m * m
        self.forward_passes += m + m * m
        scale = [n / len(p) for n, p in zip(self.shapes, self.probes)]
        self._new_probes()
        return Measurement(
            sgd_var=[float(torch.stack(e).var(0).sum()) * c for e, c in zip(tally.exact, scale)],
            act_var=[d / m**2 * c for d, c in zip(tally.act_dev, scale)],
            w_var=[v / m**2 for v in tally.w_var],
            ratios_below=[r / m for r in tally.below], ratios_above=[r / m for r in tally.above])

    def update(self, measured: Measurement) -> None:
        """VCAS's rule (``VcasSampleScheme.update``): ``s`` and the activation ratios from the
        summed activation variance against ``act_tau`` times the summed SGD variance; each layer's
        weight ratio from its weight variance against ``w_tau`` times its SGD variance."""
        c = self.config
        more = sum(measured.act_var) > c.act_tau * sum(measured.sgd_var)
        self.s = min(1.0, self.s + c.s_step) if more else max(0.0, self.s - c.s_step)
        new = itertools.accumulate(measured.ratios_below if more else measured.ratios_above, max)
        self.act_ratios = [c.act_decay * r + (1 - c.act_decay) * n for r, n in zip(self.act_ratios, new)]
        self.w_ratios = [r / c.w_mul if w > c.w_tau * sgd else r * c.w_mul
                         for r, w, sgd in zip(self.w_ratios, measured.w_var, measured.sgd_var)]

    def step(self, loss_of: Callable[[Batch], Tensor], batches: Iterator[Batch]) -> None:
        """Call before each training step (VCAS's ``training_step``): every ``every``-th step first
        measures on ``batches`` (not the step's batch) and updates; then counts the step's pass."""
        self.steps += 1
        if self.steps % self.config.every == 0:
            before = self.spent_flops
            measured = self.measure(loss_of, batches)
            self.measurement_flops += self.spent_flops - before
            self.update(measured)
            self.history.append({"step": self.steps, "s": self.s, "act_ratios": self.act_ratios,
                                 "w_ratios": self.w_ratios, "sgd_var": sum(measured.sgd_var),
                                 "act_var": sum(measured.act_var), "w_var": sum(measured.w_var)})
        self.passes += 1

    @property
    def spent_flops(self) -> float:
        """Backward GEMM and convolution FLOPs of every pass so far, measurements included."""
        return self.passes * self.exact_flops - self.saved_flops

    def record(self) -> dict[str, Any]:
        """The run's VCAS settings, passes, backward FLOPs per step relative to exact, and timeline."""
        exact = self.steps * self.exact_flops
        return {"config": dataclasses.asdict(self.config), "blocks": len(self.act_ratios),
                "layers": len(self.w_ratios), "backward_passes": self.passes,
                "measurement_forward_passes": self.forward_passes,
                "flop_ratio": self.spent_flops / exact if exact else 1.0,
                "training_flop_ratio": (self.spent_flops - self.measurement_flops) / exact if exact else 1.0,
                "measurements": self.history}


class _SampleA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, vcas: VCAS, block: int) -> Tensor:
        ctx.vcas, ctx.block = vcas, block
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        return ctx.vcas.activation_backward(ctx.block, g), None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], vcas: VCAS, layer: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.vcas, ctx.layer, ctx.has_bias = vcas, layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        gx, gw = ctx.vcas.linear_backward(ctx.layer, x, weight, g, ctx.needs_input_grad[0])
        gb = g.sum(tuple(range(g.dim() - 1))) if ctx.has_bias else None
        return gx, gw, gb, None, None


class VCASLinear(nn.Module):
    """An nn.Linear (the same parameters) whose backward :meth:`VCAS.linear_backward` computes."""

    def __init__(self, linear: nn.Linear, vcas: VCAS, layer: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.vcas, self.layer = vcas, layer

    def forward(self, x: Tensor) -> Tensor:
        return _Linear.apply(x, self.weight, self.bias, self.vcas, self.layer)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the experiments' models: a ViT's or GPT's ``blocks``; an MLP's hidden Linear
    layers (all but the last)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def wrap(model: nn.Module, blocks: Optional[Sequence[nn.Module]] = None, config: VCASConfig = VCASConfig(),
         exact_flops: float = 0.0, seed: int = 0) -> VCAS:
    """Put VCAS into ``model`` in place (VCAS's ``VcasModelProcessor.process``): swap the Linear
    layers inside each of ``blocks`` (:func:`default_blocks`; a block may be a Linear itself) for
    :class:`VCASLinear` and put SampleA at each block's output. ``exact_flops``: the exact backward's
    FLOPs, for :attr:`VCAS.spent_flops`. Returns the controller; call its :meth:`~VCAS.step`."""
    blocks = default_blocks(model) if blocks is None else list(blocks)
    vcas = VCAS(model, config, exact_flops, seed, next(model.parameters()).device)
    parents = {child: (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for b, block in enumerate(blocks):
        for linear in [m for m in block.modules() if isinstance(m, nn.Linear)]:
            swapped = VCASLinear(linear, vcas, len(vcas.w_ratios))
            parent, name = parents[linear]
            setattr(parent, name, swapped)
            vcas.w_ratios.append(1.0)
            vcas.shapes.append(linear.weight.numel())
            block = swapped if block is linear else block
        block.register_forward_hook(lambda module, args, out, b=b: _SampleA.apply(out, vcas, b))
        vcas.act_ratios.append(1.0)
    vcas._new_probes()
    return vcas
