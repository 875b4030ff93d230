"""Exact LP and MILP solving with HiGHS, for branch-and-bound leaves and small networks.

``solve`` passes a whole model to HiGHS at once (cost vector, bounds, one sparse column-wise
constraint matrix): through ``highspy`` (the ``certify`` extra) when it is installed, else
through ``scipy.optimize`` (which ships the same HiGHS solvers).

``network_milp`` encodes a small ReLU network, a chain or a DAG (``models.ops.Graph``: residual
connections, concatenations), exactly (Tjeng et al. 2019): a continuous variable per input and
per ReLU output, a binary per unstable neuron, big-M constants from sound intermediate bounds:

    a >= 0,  a >= z,  a <= u * d,  a <= z - l * (1 - d),   d in {0, 1},

where z = sum_b M_b v_b + c is the pre-activation, an affine function of the variable blocks v_b
it depends on: the input and the outputs of earlier ReLU nodes (in a chain the previous ReLU
layer only; in a DAG also those a residual connection or a concatenation carries forward). The
nodes between the ReLUs are folded, in topological order, into such affine forms
(``relu_input_forms``): an affine op (Linear, Conv, per-channel affine, average pooling,
reshape) maps the offset through itself and each block of coefficients through its linear part,
an add sums the forms of its inputs, a concatenation stacks them. The forms are dense
(convolutions expanded to matrices): this is meant for tiny networks only
(``max_matrix_elements``). Stable neurons need no binary: a = z when l >= 0, a = 0 when
u <= 0. The objective is a margin z_y - z_t, an affine form of the variables too; its minimum
over the box is negative iff the network can be fooled into class t.

A MILP optimum is the solver's word, not a certificate: HiGHS works with feasibility and
integrality tolerances, and a binary d that is off by its tolerance lets a <= u * d leak
u * tolerance, which on a badly scaled network (big-M constants of 1e11) is larger than any
margin. So ``network_milp`` is a test oracle on well-scaled tiny networks and, as a cascade
stage, a *falsifier* only (every minimizer is confirmed by the float32 model before it counts);
branch and bound closes its leaves with checked certificates. The tolerances are chosen from the
problem's scale (``scaled_tolerance``) so that the leak stays small where the solver allows it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..bounds.box import Box
from ..bounds.crown import intermediate_bounds, layer_shapes, output_shapes, relu_indices
from ..models.ops import (
    INPUT, AddOp, AvgPoolOp, ChannelAffineOp, ConcatOp, ConvOp, FlattenOp, Graph, LinearOp, Network, Op, ReluOp,
    ReshapeOp, apply_op, as_graph, require_ops,
)

# The MILP encodes every node of a chain or a DAG: affine forms between ReLU nodes, a binary per
# unstable ReLU neuron; max pooling is refused (``require_ops``).
MILP_OPS = (LinearOp, ConvOp, ChannelAffineOp, ReluOp, FlattenOp, ReshapeOp, AvgPoolOp, AddOp, ConcatOp)

INF = math.inf


@dataclass(frozen=True)
class Solution:
    """status: "optimal", "infeasible", "time-limit" or another HiGHS status string; x: the
    primal point (None unless feasible); objective: its value; bound: a proven lower bound of
    the minimum (MILP dual bound; for an LP the optimum); row_dual: row duals (LPs only)."""

    status: str
    x: np.ndarray | None
    objective: float
    bound: float
    row_dual: np.ndarray | None = None


_HIGHS_BANNER_SHOWN = False


def _highs():
    """A silent highspy.Highs (its one-time banner goes to fd 1; it is swallowed here)."""
    global _HIGHS_BANNER_SHOWN
    import highspy

    if not _HIGHS_BANNER_SHOWN:
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        try:
            solver = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)
        _HIGHS_BANNER_SHOWN = True
    else:
        solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    return solver


def highspy_available() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def solve(cost: np.ndarray, matrix, row_lower: np.ndarray, row_upper: np.ndarray, col_lower: np.ndarray,
          col_upper: np.ndarray, integer: np.ndarray | None = None, offset: float = 0.0,
          time_limit: float | None = None, tolerance: float = 1e-9, backend: str = "auto") -> Solution:
    """min cost . x + offset  s.t.  row_lower <= matrix x <= row_upper, col bounds, x_j integer
    where ``integer[j]``. ``matrix`` is anything scipy.sparse can turn into CSC."""
    import scipy.sparse as sparse

    matrix = sparse.csc_matrix(matrix, dtype=np.float64)
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (cost, row_lower, row_upper, col_lower, col_upper)]
    if backend == "auto":
        backend = "highspy" if highspy_available() else "scipy"
    if backend == "highspy":
        return _solve_highspy(matrix, *arrays, integer, offset, time_limit, tolerance)
    if backend == "scipy":
        return _solve_scipy(matrix, *arrays, integer, offset, time_limit, tolerance)
    raise ValueError(f"unknown backend {backend!r}")


def _solve_highspy(matrix, cost, row_lower, row_upper, col_lower, col_upper, integer, offset, time_limit,
                   tolerance) -> Solution:
    import highspy

    solver = _highs()
    for option, value in (("primal_feasibility_tolerance", tolerance), ("dual_feasibility_tolerance", tolerance),
                          ("mip_feasibility_tolerance", tolerance), ("mip_rel_gap", tolerance),
                          ("mip_abs_gap", tolerance), ("threads", 1)):
        solver.setOptionValue(option, value)
    if time_limit is not None:
        solver.setOptionValue("time_limit", float(max(time_limit, 1e-3)))
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = matrix.shape[1], matrix.shape[0]
    lp.col_cost_ = cost
    lp.col_lower_ = np.where(np.isinf(col_lower), -inf, col_lower)
    lp.col_upper_ = np.where(np.isinf(col_upper), inf, col_upper)
    lp.row_lower_ = np.where(np.isinf(row_lower), -inf, row_lower)
    lp.row_upper_ = np.where(np.isinf(row_upper), inf, row_upper)
    lp.offset_ = float(offset)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = matrix.shape[1], matrix.shape[0]
    lp.a_matrix_.start_ = matrix.indptr.astype(np.int32)
    lp.a_matrix_.index_ = matrix.indices.astype(np.int32)
    lp.a_matrix_.value_ = matrix.data.astype(np.float64)
    is_mip = integer is not None and bool(np.any(integer))
    if is_mip:
        lp.integrality_ = [highspy.HighsVarType.kInteger if flag else highspy.HighsVarType.kContinuous
                           for flag in integer]
    solver.passModel(lp)
    solver.run()
    status = solver.getModelStatus()
    info = solver.getInfo()
    solution = solver.getSolution()
    if status == highspy.HighsModelStatus.kOptimal:
        x = np.asarray(solution.col_value, dtype=np.float64)
        objective = float(info.objective_function_value)
        bound = float(info.mip_dual_bound) if is_mip else objective
        dual = None if is_mip else np.asarray(solution.row_dual, dtype=np.float64)
        return Solution("optimal", x, objective, bound, dual)
    if status == highspy.HighsModelStatus.kInfeasible:
        return Solution("infeasible", None, INF, INF)
    name = solver.modelStatusToString(status).lower().replace(" ", "-")
    x = np.asarray(solution.col_value, dtype=np.float64) if solution.value_valid else None
    bound = float(info.mip_dual_bound) if is_mip else -INF
    return Solution(name, x, float(info.objective_function_value) if x is not None else INF,
                    bound if math.isfinite(bound) else -INF)


def _solve_scipy(matrix, cost, row_lower, row_upper, col_lower, col_upper, integer, offset, time_limit,
                 tolerance) -> Solution:
    from scipy import optimize

    options = {"time_limit": time_limit} if time_limit is not None else {}
    if integer is not None and np.any(integer):
        result = optimize.milp(cost, constraints=optimize.LinearConstraint(matrix, row_lower, row_upper),
                               integrality=np.asarray(integer, dtype=np.int8),
                               bounds=optimize.Bounds(col_lower, col_upper),
                               options={"mip_rel_gap": tolerance, **options})
        if result.status == 0:
            bound = getattr(result, "mip_dual_bound", None)
            bound = result.fun if bound is None else bound
            return Solution("optimal", result.x, float(result.fun) + offset, float(bound) + offset)
        if result.status == 2:
            return Solution("infeasible", None, INF, INF)
        return Solution("time-limit" if result.status == 1 else "error", result.x,
                        INF if result.x is None else float(result.fun) + offset, -INF)
    # Rows as two one-sided blocks for linprog (A_ub x <= b_ub), keeping track of signs.
    upper_rows = np.isfinite(row_upper)
    lower_rows = np.isfinite(row_lower)
    blocks, rhs = [], []
    if upper_rows.any():
        blocks.append(matrix[upper_rows])
        rhs.append(row_upper[upper_rows])
    if lower_rows.any():
        blocks.append(-matrix[lower_rows])
        rhs.append(-row_lower[lower_rows])
    import scipy.sparse as sparse

    A_ub = sparse.vstack(blocks).tocsr() if blocks else None
    b_ub = np.concatenate(rhs) if rhs else None
    result = optimize.linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=np.stack([col_lower, col_upper], 1),
                              method="highs", options=options)
    if result.status == 0:
        marginals = np.asarray(result.ineqlin.marginals) if b_ub is not None else np.zeros(0)
        dual = np.zeros(matrix.shape[0])
        count = int(upper_rows.sum())
        dual[upper_rows] += marginals[:count]  # <= rows: marginal <= 0
        dual[lower_rows] -= marginals[count:]  # >= rows: a >= 0 dual in HiGHS' sign convention
        return Solution("optimal", result.x, float(result.fun) + offset, float(result.fun) + offset, dual)
    if result.status == 2:
        return Solution("infeasible", None, INF, INF)
    return Solution("error", None, INF, -INF)


# ----------------------------------------------------------------------------------------------
# The network as affine forms of the MILP's variables


@dataclass(frozen=True, eq=False)
class AffineForm:
    """A node's value as an affine function of variable blocks (the input x and the output of
    every ReLU node): value = offset + sum_b coefficients[b]^T v_b. ``offset`` (1, *node shape);
    ``coefficients[b]`` (size of block b, *node shape), row j the change of the value per unit
    of v_b[j]; blocks are keyed by node index (``INPUT`` for x)."""

    offset: Tensor
    coefficients: dict[int, Tensor]

    def matrices(self) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """({block: M_b (node neurons, block size)}, c): the value, flattened, is c + sum_b M_b v_b."""
        return ({block: coefficient.flatten(1).T.cpu().numpy() for block, coefficient in self.coefficients.items()},
                self.offset.flatten().cpu().numpy())


def variable_form(block: int, shape: tuple[int, ...], dtype, device) -> AffineForm:
    """The form of a variable block itself (the input, a ReLU's output): the identity."""
    size = math.prod(shape)
    return AffineForm(torch.zeros(1, *shape, dtype=dtype, device=device),
                      {block: torch.eye(size, dtype=dtype, device=device).view(size, *shape)})


def linear_part(op: Op) -> Op:
    """The op without its constant term: h -> op(h) - op(0)."""
    if isinstance(op, (LinearOp, ConvOp)):
        return dataclasses.replace(op, bias=None)
    if isinstance(op, ChannelAffineOp):
        return ChannelAffineOp(op.scale, torch.zeros_like(op.shift))
    return op  # reshapes, average pooling, add and concatenation are linear


def propagate_form(op: Op, forms: Sequence[AffineForm]) -> AffineForm:
    """The form of an affine op's output (an add and a concatenation included) from the forms of
    its inputs: the offsets through the op, each block's coefficients through its linear part
    (a block that an input does not depend on counts as zero there)."""
    linear = linear_part(op)
    sizes = {block: coefficient.shape[0] for form in forms for block, coefficient in form.coefficients.items()}
    coefficients = {
        block: apply_op(linear, [form.coefficients.get(block, form.offset.new_zeros(size, *form.offset.shape[1:]))
                                 for form in forms])
        for block, size in sizes.items()}
    return AffineForm(apply_op(op, [form.offset for form in forms]), coefficients)


def relu_input_forms(graph: Graph, input_shape: tuple[int, ...], max_matrix_elements: int, dtype,
                     device) -> tuple[dict[int, AffineForm], AffineForm]:
    """The form of the input of every ReLU node (keyed by the ReLU's index) and of the output,
    node by node in topological order. Forms are dense (every coefficient of every variable the
    node depends on), so this is for tiny networks only: a form of more than
    ``max_matrix_elements`` coefficients is refused."""
    shapes = output_shapes(graph, input_shape)
    last_reader = {source: index for index, node in enumerate(graph.nodes) for source in node.inputs}
    forms = {INPUT: variable_form(INPUT, input_shape, dtype, device)}
    relu_inputs: dict[int, AffineForm] = {}
    for index, node in enumerate(graph.nodes):
        inputs = [forms[source] for source in node.inputs]
        if isinstance(node.op, ReluOp):
            relu_inputs[index] = inputs[0]
            forms[index] = variable_form(index, shapes[index], dtype, device)
        else:
            with torch.no_grad():
                forms[index] = propagate_form(node.op, inputs)
            elements = sum(coefficient.numel() for coefficient in forms[index].coefficients.values())
            if elements > max_matrix_elements:
                raise ValueError(f"network too large for the dense MILP encoding (node {index}, "
                                 f"{type(node.op).__name__}, has {elements} coefficients)")
        for source in set(node.inputs):
            if last_reader[source] == index:
                del forms[source]  # read by no later node
    return relu_inputs, forms[len(graph) - 1]  # the input's form (INPUT = -1) when there is no node


@dataclass(frozen=True)
class NetworkMilpResult:
    """min over the box of z_y - z_t per target t (inf where not solved), the overall minimum,
    the minimizing input (float64, the sample's shape) and the worst target; ``exact`` is
    False when some MILP stopped early (time limit): then ``minimum`` is only a lower bound
    (the best dual bound) and counterexamples may have been missed."""

    per_target: dict[int, float]
    minimum: float
    point: Tensor | None
    target: int | None
    exact: bool


def scaled_tolerance(big_m: float) -> float:
    """Feasibility/integrality tolerance for big-M constants of magnitude ``big_m``: 1e-9 for a
    well-scaled problem, smaller as the constants grow (the leak big_m x tolerance is then about
    1e-9), never below 1e-10, the smallest tolerance HiGHS accepts."""
    return max(1e-10, min(1e-9, 1e-9 / max(big_m, 1.0)))


def network_milp(network: Network, box: Box, label: int, num_classes: int, *,
                 intermediate: Mapping[int, Box] | None = None, targets: Sequence[int] | None = None,
                 stop_below: float | None = None, time_limit: float | None = None,
                 max_matrix_elements: int = 5_000_000, backend: str = "auto") -> NetworkMilpResult:
    """Exact minimum of the margin z_label - z_t over the box (one sample, batch dim 1) by MILP,
    for every target t (default: all t != label), on a chain or a DAG. ``intermediate``: sound
    ReLU-input boxes (float64 CROWN bounds are computed when None). ``stop_below``: stop after
    the first target whose minimum is below this value (a counterexample is enough). The result
    is the solver's word (module docstring): use it to find counterexamples, never as a
    certificate."""
    import scipy.sparse as sparse

    graph = as_graph(require_ops(network, MILP_OPS, "the MILP encoding"))
    if intermediate is None:
        with torch.no_grad():
            intermediate = intermediate_bounds(network, box, "crown")
    relu_inputs, output = relu_input_forms(graph, tuple(box.lower.shape[1:]), max_matrix_elements, torch.float64,
                                           box.lower.device)

    # Columns: x, then per ReLU node its outputs a_k, then the binaries of its unstable neurons.
    col_lower = [box.lower.flatten().cpu().double().numpy()]
    col_upper = [box.upper.flatten().cpu().double().numpy()]
    integer = [np.zeros(col_lower[0].size, dtype=bool)]
    block_cols = {INPUT: np.arange(col_lower[0].size)}
    rows, row_lower, row_upper = [], [], []
    offset_cols = col_lower[0].size
    widen = 1e-9
    for index, form in relu_inputs.items():
        M, c = form.matrices()
        pre = intermediate[index]
        l = pre.lower.flatten().cpu().double().numpy()
        u = pre.upper.flatten().cpu().double().numpy()
        l = l - widen * (1 + np.abs(l))
        u = u + widen * (1 + np.abs(u))
        n = l.size
        active, inactive = l >= 0, u <= 0
        unstable = ~(active | inactive)
        a_cols = offset_cols + np.arange(n)
        d_cols = offset_cols + n + np.arange(int(unstable.sum()))
        count = offset_cols + n + d_cols.size
        col_lower.append(np.zeros(n))
        col_upper.append(np.where(inactive, 0.0, np.maximum(u, 0.0)))
        col_lower.append(np.zeros(d_cols.size))
        col_upper.append(np.ones(d_cols.size))
        integer.append(np.zeros(n, dtype=bool))
        integer.append(np.ones(d_cols.size, dtype=bool))

        def block(selected: np.ndarray, a_coef: float, d_coef: np.ndarray | None):
            # rows: a_coef * a_j - sum_b M_b,j v_b + d_coef_j * d_j for the selected neurons j
            selected_idx = np.nonzero(selected)[0]
            m = selected_idx.size
            parts = [(sparse.csr_matrix(-matrix[selected_idx]), block_cols[source]) for source, matrix in M.items()]
            a_block = sparse.csr_matrix((np.full(m, a_coef), (np.arange(m), selected_idx)), shape=(m, n))
            parts.append((a_block, a_cols))
            if d_coef is not None:
                position = np.cumsum(unstable) - 1
                d_block = sparse.csr_matrix((d_coef, (np.arange(m), position[selected_idx])), shape=(m, d_cols.size))
                parts.append((d_block, d_cols))
            return parts, m

        def add_rows(parts, m, lower, upper):
            coo_rows, coo_cols, coo_vals = [], [], []
            for part, columns in parts:
                part = part.tocoo()
                coo_rows.append(part.row)
                coo_cols.append(columns[part.col])
                coo_vals.append(part.data)
            rows.append((np.concatenate(coo_rows), np.concatenate(coo_cols), np.concatenate(coo_vals), m))
            row_lower.append(lower)
            row_upper.append(upper)

        # active: a - z = c
        parts, m = block(active, 1.0, None)
        add_rows(parts, m, c[active], c[active])
        # unstable: a - z >= c ; a - z - l d <= c - l ; a - u d <= 0   (z: the pre-activation less c)
        parts, m = block(unstable, 1.0, None)
        add_rows(parts, m, c[unstable], np.full(m, INF))
        parts, m = block(unstable, 1.0, -l[unstable])
        add_rows(parts, m, np.full(m, -INF), c[unstable] - l[unstable])
        sel = np.nonzero(unstable)[0]
        position = np.arange(sel.size)
        a_part = sparse.csr_matrix((np.ones(sel.size), (position, sel)), shape=(sel.size, n))
        d_part = sparse.csr_matrix((-u[unstable], (position, position)), shape=(sel.size, d_cols.size))
        add_rows([(a_part, a_cols), (d_part, d_cols)], sel.size, np.full(sel.size, -INF), np.zeros(sel.size))
        block_cols[index] = a_cols
        offset_cols = count

    big_m = max(float(np.abs(np.concatenate(col_upper)).max(initial=1.0)),
                max((float(intermediate[index].lower.abs().max()) for index in relu_inputs), default=1.0))
    tolerance = scaled_tolerance(big_m)
    logits_M, logits_c = output.matrices()
    row_offset = 0
    all_rows, all_cols, all_vals = [], [], []
    for r, cidx, vals, m in rows:
        all_rows.append(r + row_offset)
        all_cols.append(cidx)
        all_vals.append(vals)
        row_offset += m
    matrix = sparse.csc_matrix((np.concatenate(all_vals) if all_vals else np.zeros(0),
                                (np.concatenate(all_rows) if all_rows else np.zeros(0, int),
                                 np.concatenate(all_cols) if all_cols else np.zeros(0, int))),
                               shape=(row_offset, offset_cols))
    lower_cols, upper_cols = np.concatenate(col_lower), np.concatenate(col_upper)
    integrality = np.concatenate(integer)
    r_lower = np.concatenate(row_lower) if row_lower else np.zeros(0)
    r_upper = np.concatenate(row_upper) if row_upper else np.zeros(0)
    targets = [t for t in range(num_classes) if t != label] if targets is None else list(targets)
    per_target: dict[int, float] = {}
    best, best_point, best_target, exact = INF, None, None, True
    for target in targets:
        cost = np.zeros(offset_cols)
        for source, logits_matrix in logits_M.items():
            cost[block_cols[source]] = logits_matrix[label] - logits_matrix[target]
        solution = solve(cost, matrix, r_lower, r_upper, lower_cols, upper_cols, integrality,
                         offset=float(logits_c[label] - logits_c[target]), time_limit=time_limit,
                         tolerance=tolerance, backend=backend)
        if solution.status == "optimal":
            value = solution.objective
        else:
            exact = False
            value = solution.bound
        per_target[target] = value
        if value < best:
            best, best_target = value, target
            if solution.x is not None:
                best_point = torch.from_numpy(solution.x[:col_lower[0].size].copy()).reshape(box.lower.shape[1:])
        if stop_below is not None and solution.status == "optimal" and value < stop_below:
            break
    return NetworkMilpResult(per_target, best, best_point, best_target, exact)


def network_neurons(network: Network, input_shape: tuple[int, ...]) -> int:
    """The ReLU neurons of a network the MILP encodes (one binary at most per neuron)."""
    network = require_ops(network, MILP_OPS, "the MILP encoding")
    shapes = layer_shapes(network, input_shape)
    return sum(math.prod(shapes[index]) for index in relu_indices(network))
