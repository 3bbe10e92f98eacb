"""``p="auto"``: per-layer sketches and keep fractions chosen, during training, from measured variance.

Every weight-gradient product ``T = x @ y`` the pass hands to the controller (batch/token rows
contracted, one :class:`AutoSite` per product) runs through :meth:`AutoController.contraction`,
with one of the site's :class:`Option` s: exact, the norm sketch keeping a fraction ``p`` of the
rows (:mod:`ubcompile.sketches.norm`), or the residual sketch, which computes a rank-``2 r`` part
of ``T`` exactly and applies the norm sketch to the rest (:mod:`ubcompile.sketches.residual`;
costlier per kept row, much less noisy where the batch's rows lie near a low-dimensional subspace).
A convolution's weight gradient is a site too (:meth:`AutoController.conv_weight`): a sum over its
batch's samples, of which the norm sketch keeps a fraction, drawn by bounds ``||G_b|| ||x_b||`` on
the samples' terms (their norms would cost the exact gradient's FLOPs: they are computed at
measurements only, where they give the variances their true terms).

* **measure** (the site's first call, then after 5, 10, 20, ... calls, the gap doubling up to
  ``measure_every``, and after a spike): besides the product, the sketch variance of every option
  and the minibatch-SGD variance are estimated (:mod:`ubcompile.sketches.control`). They need the
  terms' norms ``a_j`` (computed anyway), the residual terms' norms (from the residual sketch's
  bases: a few thin GEMMs when the site is not using it already), each sample's squared norm
  (free for a plain batch, a small Gram product per sequence with tokens), and ``||T||^2``,
  estimated without bias by ``||T_hat||^2 - V_sketch`` from the sampled product itself.
* **allocate** (after every measurement): the options of all measured sites are chosen together
  (:func:`allocate`) so that their added variances sum to at most ``budget`` times the sum of their
  SGD variances, each variance over its layer's ``||T||^2`` (``budget_scale="layer"``, the
  default: an optimizer that normalises each parameter's update, as Adam does, sees each layer's
  noise relative to its own gradient) or as it is (``"global"``), with the most saved: time, by the
  device's fitted cost models of the controlled call where there are some and ``min_speedup > 0``
  (:mod:`ubcompile.cost_model`; an option they predict less than ``min_speedup`` times faster than
  exact is never offered), else FLOPs (each option's counted in
  full, bases included): noise goes where it buys the most, and a layer whose sampling is noisy
  for little saving stays exact. (The paper's trade-off is in the total variance: SGD needs about
  ``1 + sum V_sketch / sum V_sgd`` times the steps.) The uniform sketch is never an option: at the
  same ``k`` the norm sketch's variance is never above it.
* **sample** (other calls): the chosen option, dense GEMMs of inner size ``k`` (``2 r + k``).
* **propagated gradients** ``G W`` stay exact under ``grad="weight"`` (the default; their noise
  would reach every earlier layer): the pass leaves them in the graph, and the report counts their
  FLOPs. Under ``grad="both"`` a linear layer's, over a plain batch's rows (one per sample), is a
  site too, and all of a model's are one :class:`~.controller.Propagation`: in a step, the first
  (the deepest layer's) keeps ``k`` of the ``n`` samples, drawn by the norms of its ``G``'s rows,
  weighted ``1 / pi_j``; every layer below then sees at most ``k`` nonzero rows, and the next
  propagated sites keep them all: one draw, whose variance at each weight gradient below is
  ``sum_j (1 / pi_j - 1) ||t_j||^2`` over that product's per-sample terms ``t_j``, measured at steps
  whose propagated gradients run exact. The allocation prices it as one more site: that variance
  summed over the sites below, against what the propagated products save. Which products are below
  a draw is the pass's dataflow (each op names the propagated ones its cotangent comes from). Where
  rows do not stay samples (a residual connection carries the undrawn rows back, batch norm or
  attention mixes them), the **nesting check** sees more nonzero samples below a draw than it kept
  and turns the model's propagated gradients exact for good (the report says why); so does a
  product of another graph called after a draw (a graph break: the pass cannot see across it).
* **guard**: every GEMM call knows ``sum_j a_j^2`` (the squared norms of the product's terms) for
  free; a convolution's sampled and measured calls know ``sum_b`` of its bounds squared (its exact
  calls skip them: reading ``G`` and ``x`` costs a tenth of the gradient).
  When it jumps above :data:`SPIKE` times its running mean (a loss spike), the site's next calls
  are computed exactly and it is measured again, and its most aggressive allowed fraction moves
  one level towards exact; each clean measurement later gives one level back.

**No host sync.** The statistics stay on the device; the controller reads them back asynchronously
(:class:`~ubcompile.readback.Readback`) and acts on them at a later call: a measurement's
allocation, and a spike's fallback, apply from the next call on (the spiking call itself is
sampled as chosen before it). Each call's option still depends only on earlier calls, so every
gradient stays unbiased.

The product's output shape never changes, so the compiled graphs stay static: the option is
chosen inside one opaque op, among the few :data:`LEVELS` of each sketch, with no recompilation.
The op draws from the graph's seed input and registers its site at its first call (by module
and ordinal, :data:`SiteId`), finding the controller through the graph's stream input: the
graph holds no state, so a compile cache may serve it.

The package: :mod:`.policy` (a site's options and their allocation under the budget),
:mod:`.execution` (the tensor code of one call, compiled), :mod:`.controller` (the sites' state,
measurements and spike guard, fed by :mod:`ubcompile.readback`) and :mod:`.table` (the report's table).
"""

from .controller import AutoController, AutoSite, Measurement, SiteId
from .policy import BASES_EVERY, LEVELS, RESIDUAL_RANK, Option, allocate, lower_hull, site_options

__all__ = ["AutoController", "AutoSite", "BASES_EVERY", "LEVELS", "Measurement", "Option", "RESIDUAL_RANK", "SiteId",
           "allocate", "lower_hull", "site_options"]
