"""Branch and bound over unstable ReLUs: a complete verifier for one sample.

The property is: for every class t != y, z_y - z_t > 0 on the input box. Each class t is a
separate sub-property; a *domain* is (t, splits): the box restricted to inputs whose
pre-activations satisfy a set of ReLU splits (neuron <= 0 or >= 0). The queue holds domains
ordered by their margin lower bound, lowest first:

1. **Bounding** (batched): up to ``batch_domains`` domains are popped, each is split into its
   two children on the neuron chosen when it was bounded, and the children are stacked along
   the batch dim. Intermediate bounds: the root's (CROWN for the small layers, IBP for the
   others, computed once) tightened by the splits and by IBP ("ibp", default) or recomputed
   with the splits ("crown"). The margin row e_y - e_t is bounded by ``split_bound``: CROWN
   with optimized slopes alpha (alpha-CROWN) and Lagrange multipliers beta >= 0 for the split
   constraints (beta-CROWN, Wang et al. 2021), a few projected Adam steps; the multipliers are
   inherited from the parent and the new split's is initialized in closed form. Without the
   multipliers the bound of a domain ignores where its splits cut the box, and an active split
   makes it *looser* than its parent's.
2. **Pruning**: a child whose float32 bound exceeds the safety threshold is re-bounded
   rigorously on the real network (``rigorous``: its splits, slopes and multipliers, rigorous
   intermediate bounds from the rigorous root bounds) and closed when that bound exceeds the
   threshold too.
3. **Falsifying**: the input that minimizes each child's linear lower bound (a box corner)
   is a candidate counterexample, as are a PGD attack at the root and the minimizer of each LP
   leaf; a candidate counts only after a float32 forward pass of the model confirms it (inside
   the box, misclassified). One confirmed counterexample ends the search: falsified.
4. **Leaves**: a child without unstable neurons (all ReLUs fixed by splits or by bounds, also
   in its rigorous bounds) is linear on its region, which is the box cut by the split
   half-spaces. Its minimum is an LP over the input (``milp.solve``) whose rows and objective
   are rigorous backward passes (``rigorous.backward``, the ReLUs exact 0/1 maps): each row
   holds at every point of the real region, so the LP's region contains it. The leaf is closed
   by a Lagrangian bound built from the LP duals and evaluated rigorously
   (``soundness.lagrangian_lower_bound``; sound whatever the solver's accuracy); an empty
   region is closed by a Farkas certificate evaluated the same way; a negative minimum gives a
   candidate counterexample. A leaf that is neither closed nor falsified (a margin within the
   safety threshold of 0) leaves the sample unknown.
5. **Branching**: on the unstable neuron with the largest score |A_j| * (-l_j u_j)/(u_j - l_j)
   (a BaBSR-like estimate of how much the chord relaxation of neuron j loosens the bound; A_j is
   the coefficient of relu(h_j) in the child's linear bound), ties broken by the gap alone.

**Networks**: chains and DAGs (``models.ops.Graph``: residual connections, concatenations)
alike, node by node (a node reads ``node.inputs``; a chain is the graph whose node k reads k - 1).
A split is on a ReLU's input, the output of the node it reads: the bounds
(``bounds.crown.backward``, ``rigorous.backward``) price it where the backward pass leaves the
ReLU, a split-tightened ReLU input box replaces that node's box for every reader (a skip
connection too), and a leaf's row for a split neuron is a rigorous backward pass through the
nodes up to that node. Max pooling is refused (``check_network``).

The search ends certified when the queue empties (every domain closed), falsified on a
confirmed counterexample, unknown on the time-out (``timeout``, paper 1000 s; checked between
batches, so a search can overrun it by one batch), the domain limit, or an undecidable leaf.
Domains keep only their split decisions (layer, neuron, sign) and one multiplier per decision,
not their slopes: children restart alpha from the adaptive CROWN slopes.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch
from torch import Tensor

from ..attacks.pgd import PGDSettings, margin_loss, pgd_attack
from ..bounds.box import Box
from ..bounds.crown import (
    LinearBound, adaptive_alpha, apply_split, backward, concretize_lower, intermediate_bounds, layer_shapes,
    nonlinear_indices, relu_indices, relu_relaxation,
)
from ..bounds.ibp import ibp_node
from ..models.ops import (
    INPUT, AddOp, AvgPoolOp, ChannelAffineOp, ConcatOp, ConvOp, FlattenOp, LinearOp, Network, ReluOp, ReshapeOp,
    as_graph, network_prefix, node_inputs, require_ops, run_ops, source_of,
)
from . import milp, rigorous
from .soundness import (
    SafetyMargin, clean_logits64, infeasibility_certificate, intersect_intermediate, lagrangian_lower_bound,
    margin_rows,
)

Decision = tuple[int, int, int]  # (ReLU node index, flat neuron index, sign -1 / +1)


@dataclass(frozen=True)
class BabSettings:
    """timeout: seconds per sample; batch_domains: domains popped per step (each gives two
    children); alpha_iterations / root_alpha_iterations: optimization steps per child / at the
    root; lr: for the slopes alpha; beta / beta_lr: optimize multipliers of the split
    constraints (beta-CROWN) and their learning rate; intermediate: bounds of the ReLU inputs
    at the root, "crown" (CROWN for ReLU layers with at most crown_max_neurons neurons, IBP for
    the others) or "ibp"; domain_intermediate: per domain, "ibp" (IBP with the splits,
    intersected layer by layer with the root's boxes: cheap, the beta multipliers carry the
    rest, as in beta-CROWN) or "crown" (recomputed with the splits as at the root: tighter, one
    backward pass per unstable neuron of the CROWN layers); max_domains: give up (unknown) after bounding this many;
    lp_leaves: solve leaves exactly (else a leaf that bounds cannot close stays unknown);
    attack_steps / attack_restarts: PGD (margin loss) at the root, 0 restarts for none."""

    timeout: float = 1000.0
    batch_domains: int = 32
    alpha_iterations: int = 8
    root_alpha_iterations: int = 30
    lr: float = 0.1
    beta: bool = True
    beta_lr: float = 0.05
    intermediate: str = "crown"
    domain_intermediate: str = "ibp"
    crown_max_neurons: int = 4096
    max_domains: int = 200_000
    lp_leaves: bool = True
    attack_steps: int = 20
    attack_restarts: int = 5
    seed: int = 0


@dataclass(frozen=True)
class BabResult:
    """status: "certified", "falsified" or "unknown"; margin_lower: for certified the smallest
    rigorous lower bound of z_y - z_t over all closed domains (inf when every region
    was empty), otherwise the smallest lower bound over the open domains (float32);
    counterexample: a confirmed float32 point (falsified only); target: its class; domains:
    children bounded; detail: why it stopped."""

    status: str
    margin_lower: float
    counterexample: Tensor | None = None
    target: int | None = None
    domains: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass(order=True)
class _Domain:
    lower: float
    sequence: int
    target: int = field(compare=False)
    decisions: tuple[Decision, ...] = field(compare=False)
    branch: tuple[int, int] | None = field(compare=False)
    betas: tuple[float, ...] = field(compare=False, default=())  # one multiplier per decision


class _Stop(Exception):
    def __init__(self, result: BabResult) -> None:
        super().__init__(result.status)
        self.result = result


# Branch and bound splits the ReLUs of a chain or a DAG; max pooling is refused (``check_network``).
BAB_OPS = (LinearOp, ConvOp, ChannelAffineOp, ReluOp, FlattenOp, ReshapeOp, AvgPoolOp, AddOp, ConcatOp)


def check_network(network: Network) -> Network:
    """The network (a chain or a DAG) when branch and bound handles its ops, else a TypeError
    that says why."""
    return require_ops(network, BAB_OPS, "branch and bound")


def auto_crown_layers(ops: Network, input_shape: tuple[int, ...], max_neurons: int) -> list[int]:
    """ReLU and max-pool node indices whose input has at most ``max_neurons`` neurons (per
    sample)."""
    shapes = layer_shapes(ops, input_shape)
    return [index for index in nonlinear_indices(ops) if math.prod(shapes[index]) <= max_neurons]


def split_bound(network: Network, box: Box, spec: Tensor, intermediate, alphas, betas, signs,
                input_shape: tuple[int, ...], capture: bool = False):
    """CROWN lower bound of the spec rows over the box *and* the split half-spaces, with the
    split constraints priced in by Lagrange multipliers (beta-CROWN, Wang et al. 2021):
    for a split neuron j (sign s_j, s_j h_j >= 0 on the domain) and beta_j >= 0,

        C f(x) >= C f(x) - sum_j beta_j s_j h_j(x)     on the domain,

    so the term -beta_j s_j is added to the coefficient of h_j when the backward pass crosses
    the ReLU. Every alpha in [0, 1] and beta >= 0 gives a sound bound (clamped here).

    Returns (lower (B, S), the bound at the input, and when ``capture`` a dict
    {ReLU node index: (A w.r.t. its output, A w.r.t. its input before the beta term)})."""
    relaxations = {index: relu_relaxation(pre, alphas.get(index) if alphas else None)
                   for index, pre in intermediate.items()}
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def price_splits(index: int, output_A: Tensor, bound: LinearBound) -> LinearBound:
        if capture:
            captured[index] = (output_A, bound.A)
        if betas and index in betas:
            sign = signs[index].to(bound.A.dtype).unsqueeze(1)
            bound = LinearBound(bound.A - betas[index].clamp(min=0) * sign, bound.bias)
        return bound

    start = LinearBound(spec, torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device))
    bound = backward(network, start, input_shape, relaxations, after_relu=price_splits)
    return concretize_lower(bound, box), bound, captured


class BranchAndBound:
    """Complete verification of one sample at a time (see the module docstring).

    ``ops32``/``ops64``: the network (a chain or a DAG) lowered in float32 / float64 (the
    float64 clean logits set the safety threshold); ``net``: the real network every closed
    domain is proven on, node for node the same
    (``rigorous.interval_network(model)``, as the cascade passes; default: ``ops64`` read as
    exact points, ``rigorous.point_network``, which is the model itself when it has no BatchNorm
    or Normalize layer); ``confirm(points, x, label)`` returns a bool per float32 candidate
    (N, *shape): True when the plain float32 forward pass of the model misclassifies it and it
    lies in the box. The cascade passes one built on ``verdicts.check_counterexample``."""

    def __init__(self, ops32: Network, ops64: Network, settings: BabSettings = BabSettings(),
                 safety: SafetyMargin = SafetyMargin(),
                 confirm: Callable[[Tensor, Tensor, int], Tensor] | None = None,
                 net: Network | None = None) -> None:
        self.ops32, self.ops64 = check_network(ops32), check_network(ops64)
        self.net = net if net is not None else rigorous.point_network(self.ops64)
        self.settings = settings
        self.safety = safety
        self.confirm = confirm
        self.relus = relu_indices(self.ops32)

    # ------------------------------------------------------------------------------------------
    def verify(self, x: Tensor, label: int, eps: float, num_classes: int,
               data_range: tuple[float, float] = (0.0, 1.0), *, targets: Collection[int] | None = None,
               deadline: float | None = None) -> BabResult:
        """Run branch and bound on one sample ``x`` (no batch dim, float32)."""
        start = time.monotonic()
        settings = self.settings
        self._start = start
        self._deadline = min(deadline if deadline is not None else math.inf, start + settings.timeout)
        self._x, self._label, self._eps, self._data_range = x.detach().float(), int(label), eps, data_range
        self._num_classes = num_classes
        self._input_shape = tuple(x.shape)
        self._device = x.device
        lo, hi = data_range
        x32 = self._x.unsqueeze(0)
        self._box32 = Box((x32 - eps).clamp(min=lo), (x32 + eps).clamp(max=hi))
        self._box_real = rigorous.rigorous_box(x32, eps, data_range)
        self._threshold = float(self.safety.threshold(clean_logits64(self.ops64, x32))[0])
        self._crown_layers = auto_crown_layers(self.ops32, self._input_shape, settings.crown_max_neurons)
        self._real_crown_layers = self._crown_layers if settings.intermediate == "crown" else []
        with torch.no_grad():
            self._root32 = intermediate_bounds(self.ops32, self._box32, settings.intermediate,
                                               crown_layers=self._crown_layers)
        root = rigorous.layer_bounds(self.net, self._box_real, crown_layers=self._real_crown_layers)
        self._root_real = {index: root[index] for index in self.relus}
        self._shapes = layer_shapes(self.ops32, self._input_shape)
        self._verified_min = math.inf
        self._undecided = 0
        self._undecided_min = math.inf  # smallest rigorous bound of an undecided leaf (-inf: none computed)
        self._domains = 0
        self._sequence = itertools.count()
        targets = [t for t in range(num_classes) if t != self._label] if targets is None else list(targets)
        try:
            self._root_attack()
            queue: list[_Domain] = []
            self._bound_and_push([(t, (), ()) for t in targets], queue, settings.root_alpha_iterations)
            while queue:
                if time.monotonic() > self._deadline:
                    return self._result("unknown", queue, "timeout")
                if self._domains >= settings.max_domains:
                    return self._result("unknown", queue, "domain limit")
                popped = [heapq.heappop(queue) for _ in range(min(settings.batch_domains, len(queue)))]
                children = []
                for domain in popped:
                    layer, neuron = domain.branch
                    for sign in (-1, 1):
                        children.append((domain.target, domain.decisions + ((layer, neuron, sign),), domain.betas))
                self._bound_and_push(children, queue, settings.alpha_iterations)
        except _Stop as stop:
            return stop.result
        if self._undecided:
            return self._result("unknown", [], f"{self._undecided} linear leaf region(s) neither closed by a "
                                               f"rigorous bound above {self._threshold:.3g} nor falsified")
        return self._result("certified", [], "all domains closed")

    # ------------------------------------------------------------------------------------------
    def _result(self, status: str, queue: list[_Domain], detail: str) -> BabResult:
        if status == "certified":
            margin = self._verified_min
        else:
            margin = min([d.lower for d in queue] + [self._verified_min, self._undecided_min])
        return BabResult(status, margin, domains=self._domains, seconds=time.monotonic() - self._start,
                         detail=f"{detail}; domains={self._domains}")

    def _falsified(self, point: Tensor, target: int | None, detail: str) -> _Stop:
        with torch.no_grad():
            logits = run_ops(self.ops32, point.unsqueeze(0))[0]
        others = logits.clone()
        others[self._label] = -math.inf
        margin = float(logits[self._label] - others.max())
        return _Stop(BabResult("falsified", margin, point.detach().float().clone(), target, self._domains,
                               time.monotonic() - self._start, f"{detail}; domains={self._domains}"))

    def _check_candidates(self, points: Tensor, targets: Sequence[int | None], detail: str) -> None:
        """Raise _Stop(falsified) if one of the float32 points (N, *shape) is a confirmed
        counterexample. The ops pre-filter; ``confirm`` (the model's own forward pass) decides."""
        from .verdicts import project_float32

        points = project_float32(points, self._x.unsqueeze(0).expand_as(points), self._eps, self._data_range)
        with torch.no_grad():
            logits = run_ops(self.ops32, points)
        others = logits.clone()
        others[:, self._label] = -math.inf
        suspects = (others.amax(dim=1) >= logits[:, self._label]).nonzero().flatten()
        if suspects.numel() == 0:
            return
        chosen = points[suspects]
        if self.confirm is None:
            valid = torch.ones(chosen.shape[0], dtype=torch.bool)
        else:
            valid = self.confirm(chosen, self._x, self._label).cpu()
        if valid.any():
            k = int(valid.nonzero()[0])
            raise self._falsified(chosen[k], targets[int(suspects[k])], detail)

    def _root_attack(self) -> None:
        settings = self.settings
        if settings.attack_restarts <= 0:
            return
        generator = torch.Generator(device=self._device).manual_seed(settings.seed)
        labels = torch.tensor([self._label], device=self._device)
        point = pgd_attack(lambda z: run_ops(self.ops32, z), self._box32, labels,
                           PGDSettings(steps=settings.attack_steps, restarts=settings.attack_restarts),
                           loss_fn=margin_loss, generator=generator)
        self._check_candidates(point, [None], "PGD at the root")

    # ------------------------------------------------------------------------------------------
    def _masks(self, domains: Sequence[tuple]) -> dict[int, Tensor]:
        count = len(domains)
        masks = {index: torch.zeros(count, math.prod(self._shapes[index]), dtype=torch.int8, device=self._device)
                 for index in self.relus}
        for row, domain in enumerate(domains):
            for layer, neuron, sign in domain[1]:
                masks[layer][row, neuron] = sign
        return {index: mask.view(count, *self._shapes[index]) for index, mask in masks.items()}

    def _expand(self, box: Box, count: int) -> Box:
        return Box(box.lower.expand(count, *box.lower.shape[1:]), box.upper.expand(count, *box.upper.shape[1:]))

    def _spec(self, targets: Sequence[int], dtype: torch.dtype) -> Tensor:
        labels = torch.full((len(targets),), self._label, device=self._device)
        return margin_rows(labels, self._num_classes, dtype, torch.tensor(targets, device=self._device).unsqueeze(1))

    def _bound_and_push(self, domains: list[tuple], queue: list[_Domain],
                        iterations: int) -> None:
        for chunk_start in range(0, len(domains), max(1, 2 * self.settings.batch_domains)):
            chunk = domains[chunk_start:chunk_start + 2 * self.settings.batch_domains]
            if time.monotonic() > self._deadline and queue:
                for target, decisions, betas in chunk:  # kept (unbounded) for the final margin report
                    heapq.heappush(queue, _Domain(-math.inf, next(self._sequence), target, decisions, None, betas))
                continue
            self._bound_chunk(chunk, queue, iterations)

    def _domain_intermediate(self, network: Network, box: Box, split: dict[int, Tensor],
                             root: dict[int, Box]) -> dict[int, Box]:
        """Sound ReLU-input boxes of a batch of domains: the root's boxes tightened by the
        splits and by IBP from the tightened earlier nodes ("ibp"), or recomputed with CROWN
        with the splits and intersected with the root's ("crown"). A tightened ReLU input
        replaces the box of the node it reads for every reader (a skip connection too)."""
        with torch.no_grad():
            if self.settings.domain_intermediate == "crown":
                return intersect_intermediate(
                    intermediate_bounds(network, box, self.settings.intermediate, split=split,
                                        crown_layers=self._crown_layers), root)
            boxes: dict[int, Box] = {}
            outputs: list[Box] = []
            graph = as_graph(network)
            for index, node in enumerate(graph.nodes[:self.relus[-1] + 1] if self.relus else ()):
                inputs = node_inputs(outputs, box, node)
                if isinstance(node.op, ReluOp):
                    bound, source = root[index], node.inputs[0]
                    pre = Box(torch.maximum(inputs[0].lower, bound.lower), torch.minimum(inputs[0].upper, bound.upper))
                    pre = apply_split(pre, split.get(index))
                    boxes[index] = pre
                    inputs = [pre]
                    if source != INPUT:
                        outputs[source] = pre
                outputs.append(ibp_node(node.op, inputs))
            return boxes

    def _optimize(self, box: Box, spec: Tensor, intermediate, signs, iterations: int, domains: Sequence[tuple]):
        """Maximize the split bound over alpha in [0, 1] and beta >= 0 by projected Adam; the
        best value per row and the slopes / multipliers that gave it (detached).

        Slopes start from the adaptive CROWN choice. Multipliers start from the parent's (one
        value per split decision, ``domains[row][2]``); the new split's from the closed form
        beta_j = max(s_j a_j, 0), a_j the coefficient of h_j in the bound: for an active split
        (s = +1) with a_j > 0 this cancels the term a_j h_j, whose minimum over the box (at
        h_j = l_j < 0) the domain excludes."""
        count, rows = spec.shape[:2]
        alphas = {index: adaptive_alpha(pre).unsqueeze(1).expand(count, rows, *pre.lower.shape[1:]).clone()
                  for index, pre in intermediate.items()}
        betas = {index: torch.zeros(count, rows, *sign.shape[1:], dtype=spec.dtype, device=spec.device)
                 for index, sign in signs.items() if self.settings.beta and bool(sign.any())}
        fresh = []
        for row, (_, decisions, inherited) in enumerate(domains):
            for k, (layer, neuron, sign) in enumerate(decisions):
                if not self.settings.beta:
                    continue
                if k < len(inherited):
                    betas[layer].view(count, rows, -1)[row, :, neuron] = inherited[k]
                else:
                    fresh.append((row, layer, neuron, sign))
        if fresh:
            with torch.no_grad():
                _, _, captured = split_bound(self.ops32, box, spec, intermediate, alphas, betas, signs,
                                             self._input_shape, capture=True)
            for row, layer, neuron, sign in fresh:
                coefficient = captured[layer][1].reshape(count, rows, -1)[row, :, neuron]
                betas[layer].view(count, rows, -1)[row, :, neuron] = (sign * coefficient).clamp(min=0)
        for tensor in list(alphas.values()) + list(betas.values()):
            tensor.requires_grad_(True)
        groups = [{"params": list(alphas.values()), "lr": self.settings.lr}]
        if betas:
            groups.append({"params": list(betas.values()), "lr": self.settings.beta_lr})
        optimizer = torch.optim.Adam(groups) if alphas or betas else None
        best, best_alphas, best_betas = None, {}, {}
        steps = max(1, iterations)
        for step in range(steps):
            with torch.enable_grad():
                lower, _, _ = split_bound(self.ops32, box, spec, intermediate, alphas, betas, signs, self._input_shape)
            current = lower.detach()
            if best is None:
                best = current.clone()
                best_alphas = {i: a.detach().clone() for i, a in alphas.items()}
                best_betas = {i: b.detach().clamp(min=0) for i, b in betas.items()}
            else:
                improved = current > best
                best = torch.where(improved, current, best)
                for store, params, clamp in ((best_alphas, alphas, None), (best_betas, betas, 0.0)):
                    for i, value in params.items():
                        mask = improved.view(*improved.shape, *([1] * (value.dim() - 2)))
                        value = value.detach() if clamp is None else value.detach().clamp(min=clamp)
                        store[i] = torch.where(mask, value, store[i])
            if step == steps - 1 or optimizer is None or not lower.requires_grad:
                break
            optimizer.zero_grad(set_to_none=True)
            (-lower.sum()).backward()
            optimizer.step()
            with torch.no_grad():
                for value in alphas.values():
                    value.clamp_(0.0, 1.0)
                for value in betas.values():
                    value.clamp_(min=0.0)
        return best, best_alphas, best_betas

    def _bound_chunk(self, domains: list[tuple], queue: list[_Domain], iterations: int) -> None:
        count = len(domains)
        self._domains += count
        targets = [domain[0] for domain in domains]
        split = self._masks(domains)
        box = self._expand(self._box32, count)
        intermediate = self._domain_intermediate(self.ops32, box, split, self._root32)
        spec = self._spec(targets, torch.float32)
        best, alphas, betas = self._optimize(box, spec, intermediate, split, iterations, domains)
        lower = best[:, 0]
        with torch.no_grad():
            _, input_bound, coefficients = split_bound(self.ops32, box, spec, intermediate, alphas, betas, split,
                                                       self._input_shape, capture=True)
        # Candidate counterexamples: the corners that minimize each linear lower bound.
        A_input = input_bound.A[:, 0]
        corners = torch.where(A_input >= 0, box.lower, box.upper)
        open_rows = (lower <= self._threshold).nonzero().flatten()
        if open_rows.numel():
            self._check_candidates(corners[open_rows], [targets[i] for i in open_rows.tolist()],
                                   "minimizer of a domain's bound")
        # Close domains whose bound is above the threshold, after a rigorous re-check.
        closed = torch.zeros(count, dtype=torch.bool)
        candidates = (lower > self._threshold).nonzero().flatten()
        if candidates.numel():
            rows = candidates.tolist()
            lower_real = self._recheck([targets[i] for i in rows], {i: m[candidates] for i, m in split.items()},
                                        {i: a[candidates] for i, a in alphas.items()},
                                        {i: b[candidates] for i, b in betas.items()})
            for row, bound in zip(rows, lower_real.tolist()):
                if bound > self._threshold:
                    closed[row] = True
                    self._verified_min = min(self._verified_min, bound)
        # Branching decisions (or leaves) for the rest.
        unstable_count = torch.zeros(count, dtype=torch.long, device=self._device)
        scores = []
        for index in self.relus:
            pre = intermediate[index]
            l, u = pre.lower.flatten(1), pre.upper.flatten(1)
            unstable = (l < 0) & (u > 0)
            unstable_count += unstable.sum(dim=1)
            gap = torch.where(unstable, -l * u / torch.where(unstable, u - l, torch.ones_like(u)), torch.zeros_like(u))
            weight = coefficients[index][0][:, 0].flatten(1).abs()
            scores.append(torch.where(unstable, weight * gap + 1e-6 * gap + 1e-30, torch.full_like(gap, -1.0)))
        flat_scores = torch.cat(scores, dim=1) if scores else torch.zeros(count, 0, device=self._device)
        offsets = list(itertools.accumulate([0] + [s.shape[1] for s in scores]))
        for row in range(count):
            if closed[row]:
                continue
            target, decisions, _ = domains[row]
            if int(unstable_count[row]) == 0:
                branch = self._leaf(target, decisions)
                if branch is None:
                    continue
            else:
                position = int(flat_scores[row].argmax())
                layer_number = max(k for k in range(len(self.relus)) if offsets[k] <= position)
                branch = (self.relus[layer_number], position - offsets[layer_number])
            kept = tuple(float(betas[layer][row, 0].flatten()[neuron]) if layer in betas else 0.0
                         for layer, neuron, _ in decisions)
            heapq.heappush(queue, _Domain(float(lower[row]), next(self._sequence), target, decisions, branch, kept))

    def _real_bounds(self, box: Box, split: dict[int, Tensor]) -> list[Box]:
        """Rigorous bounds of every layer of the real network for a batch of domains
        (``rigorous.layer_bounds``): the root's ReLU boxes tightened by the splits and by IBP
        ("ibp"), or by CROWN with the splits as well ("crown"), like ``_domain_intermediate``."""
        crown = self._real_crown_layers if self.settings.domain_intermediate == "crown" else ()
        return rigorous.layer_bounds(self.net, box, crown_layers=crown, split=split, given=self._root_real)

    def _recheck(self, targets: list[int], split: dict[int, Tensor], alphas, betas) -> Tensor:
        """The split bound of the given domains recomputed rigorously on the real network (same
        slopes and multipliers, rigorous intermediate bounds with the splits), shape (n,)."""
        box = self._expand(self._box_real, len(targets))
        bounds = self._real_bounds(box, split)
        return rigorous.crown_lower(self.net, bounds, self._spec(targets, torch.float64), alphas, betas, split)[:, 0]

    # ------------------------------------------------------------------------------------------
    def _leaf(self, target: int, decisions: tuple[Decision, ...]) -> tuple[int, int] | None:
        """Decide a domain without unstable neurons (float32). Returns a neuron to branch on when
        its rigorous bounds still see one unstable, else None (closed, undecided, or raises _Stop)."""
        split = self._masks([(target, decisions, ())])
        bounds = self._real_bounds(self._box_real, split)
        best, best_branch = -1.0, None
        for index in self.relus:
            pre = bounds[index]
            l, u = pre.lower.flatten(), pre.upper.flatten()
            gap = torch.where((l < 0) & (u > 0), torch.minimum(-l, u), torch.full_like(l, -1.0))
            if gap.numel() and float(gap.max()) > best:
                best, best_branch = float(gap.max()), (index, int(gap.argmax()))
        if best > 0:
            return best_branch
        if not self.settings.lp_leaves:
            self._undecide(-math.inf)
            return None
        self._solve_leaf(target, decisions, bounds)
        return None

    def _undecide(self, bound: float) -> None:
        """A leaf neither closed nor falsified; ``bound``: its rigorous lower bound, if any."""
        self._undecided += 1
        self._undecided_min = min(self._undecided_min, bound)

    def _leaf_rows(self, decisions: tuple[Decision, ...], bounds: list[Box]) -> tuple[Tensor, Tensor]:
        """LP rows G x <= h that every point of the leaf's real region satisfies: for a split
        (j, s) of a ReLU whose input h is the output of node k, ``rigorous.backward`` of the row
        -s e_j through the nodes up to k gives -s h_j(x) >= a . x + c there, and s h_j(x) >= 0,
        so a . x <= -c."""
        rows_A, rows_b = [], []
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, neuron, sign in decisions:
            by_layer.setdefault(layer, []).append((neuron, sign))
        for layer, items in by_layer.items():
            count = len(items)
            A = torch.zeros(1, count, math.prod(self._shapes[layer]), dtype=torch.float64, device=self._device)
            neurons = torch.tensor([n for n, _ in items], device=self._device)
            A[0, torch.arange(count, device=self._device), neurons] = torch.tensor(
                [-s for _, s in items], dtype=torch.float64, device=self._device)
            source = source_of(self.net, layer)
            A_in, offset = rigorous.backward(network_prefix(self.net, source + 1), bounds[:source + 1],
                                             A.view(1, count, *self._shapes[layer]))
            rows_A.append(A_in[0].flatten(1))
            rows_b.append(-offset[0])
        n = math.prod(self._input_shape)
        G = torch.cat(rows_A) if rows_A else torch.zeros(0, n, dtype=torch.float64, device=self._device)
        h = torch.cat(rows_b) if rows_b else torch.zeros(0, dtype=torch.float64, device=self._device)
        return G, h

    def _solve_leaf(self, target: int, decisions: tuple[Decision, ...], bounds: list[Box]) -> None:
        """The leaf's LP on rigorous data (``_leaf_rows``; margin >= g . x + g0 on the region by
        ``rigorous.backward``), closed by a rigorous Lagrangian bound from its duals."""
        G, h = self._leaf_rows(decisions, bounds)
        objective_A, objective_offset = rigorous.backward(self.net, bounds, self._spec([target], torch.float64))
        g, g0 = objective_A[0, 0].flatten(), float(objective_offset[0, 0])
        lower, upper = self._box_real.lower.flatten(), self._box_real.upper.flatten()
        G_np, h_np = G.cpu().numpy(), h.cpu().numpy()
        inf = float("inf")
        solution = milp.solve(g.cpu().numpy(), G_np, [-inf] * h_np.size if h_np.size else h_np, h_np,
                              lower.cpu().numpy(), upper.cpu().numpy(), offset=g0,
                              time_limit=max(self._deadline - time.monotonic(), 1.0))
        if solution.status == "optimal":
            dual = torch.from_numpy(solution.row_dual if solution.row_dual is not None
                                    else torch.zeros(h_np.size).numpy()).to(torch.float64).to(self._device)
            bound = max(lagrangian_lower_bound(g, g0, G, h, -dual, lower, upper),
                        lagrangian_lower_bound(g, g0, G, h, dual, lower, upper))
            if bound > self._threshold:
                self._verified_min = min(self._verified_min, bound)
                return
            if solution.objective < 0 and solution.x is not None:
                point = torch.from_numpy(solution.x).to(self._device).view(1, *self._input_shape)
                self._check_candidates(point.float(), [target], "LP minimizer of a linear region")
            self._undecide(bound)
            return
        if solution.status == "infeasible":
            if self._empty_region(G, h, lower, upper):
                return
        self._undecide(-math.inf)

    def _empty_region(self, G: Tensor, h: Tensor, lower: Tensor, upper: Tensor) -> bool:
        """Prove {x in box : G x <= h} empty: max t s.t. G x + t <= h, t <= 1, and check the
        duals as a Farkas certificate, evaluated rigorously."""
        rows, n = G.shape
        if rows == 0:
            return False
        matrix = torch.cat([G, torch.ones(rows, 1, dtype=G.dtype, device=G.device)], dim=1).cpu().numpy()
        cost = torch.zeros(n + 1, dtype=torch.float64)
        cost[-1] = -1.0
        col_lower = torch.cat([lower.cpu(), torch.tensor([-math.inf], dtype=torch.float64)]).numpy()
        col_upper = torch.cat([upper.cpu(), torch.tensor([1.0], dtype=torch.float64)]).numpy()
        solution = milp.solve(cost.numpy(), matrix, [-math.inf] * rows, h.cpu().numpy(), col_lower, col_upper)
        if solution.status != "optimal" or solution.row_dual is None:
            return False
        dual = torch.from_numpy(solution.row_dual).to(G)
        value = max(infeasibility_certificate(G, h, -dual, lower, upper),
                    infeasibility_certificate(G, h, dual, lower, upper))
        return value > self.safety.atol
