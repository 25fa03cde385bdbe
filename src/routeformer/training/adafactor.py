"""torch.optim.Adafactor's update without host synchronisation.

torch's Adafactor (2.5 to 2.13, foreach and single-tensor paths alike) reads two scalars per parameter
back to the host on every step: the parameter's RMS (for the relative step size) and the update's RMS
(for update clipping), `.item()` each. On CUDA that is two device synchronisations per parameter: for
the paper's enwik8 preset (161M parameters in ~150 tensors, T = 8192) a step took 62.8 ms with Adafactor
against 35.7 ms with fused AdamW under torch.compile's CUDA graphs (H200, benchmarks/model_step.py).

`Adafactor` here is the same optimizer (a subclass: same arguments, state and state_dict, so checkpoints
load either way) whose step keeps those scalars on the device: the RMS values of all parameters of a
group come from one torch._foreach_norm, and the step sizes are tensors. The math is torch's, in the same
order (tests/training/test_adafactor.py checks parameters and state against torch.optim.Adafactor):
    t += 1;  beta2_t = 1 - t^decay;  rho_t = min(lr, 1/sqrt(t))
    alpha = max(eps2, RMS(param)) * rho_t;  param *= 1 - lr * weight_decay
    matrices: R = lerp(R, mean_cols(g^2), 1 - beta2_t), C likewise over rows, V = R C / mean(R)
    vectors:  V = lerp(V, g^2, 1 - beta2_t)
    u = g / sqrt(max(V, eps1^2));  param -= alpha / max(1, RMS(u) / d) * u
The step counters stay on the CPU (as torch keeps them), so reading them costs no device sync.
"""
from __future__ import annotations

import torch


def _rms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n,) RMS of each tensor (float32, float64 for float64 tensors; one dtype per call): one foreach
    norm, one foreach division by Python scalars (a tensor of the sizes would be a host-to-device copy,
    which synchronises from pageable memory)."""
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=wide)
    torch._foreach_div_(norms, [t.numel() ** 0.5 for t in tensors])
    return torch.stack(norms)


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor (same arguments and state) with a step free of host synchronisation."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _init_state(self, p: torch.Tensor) -> dict:
        """The state torch's Adafactor gives a parameter on its first step (same keys and shapes)."""
        state = self.state[p]
        if len(state) == 0:
            # torch's scalar dtype for step counters: float64 under a float64 default dtype, else float32.
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=scalar)
            if p.grad.dim() > 1:
                row_shape, col_shape = list(p.grad.shape), list(p.grad.shape)
                row_shape[-1], col_shape[-2] = 1, 1
                state["row_var"] = p.grad.new_zeros(row_shape)
                state["col_var"] = p.grad.new_zeros(col_shape)
            else:
                state["variance"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict) -> None:
        lr = group["lr"]
        lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)  # a CPU scalar if a tensor
        eps1, eps2 = group["eps"]
        # Parameters that share a step count (normally all of them) share beta2_t and rho_t.
        by_step: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            state = self._init_state(p)
            state["step"] += 1
            by_step.setdefault((float(state["step"].item()), p.device, p.dtype), []).append((p, state))
        for (t, _, dtype), members in by_step.items():
            # Matrices first, then vectors: each kind's statistics in foreach launches (as torch's
            # foreach path), and every later list in this one order.
            members = ([m for m in members if m[0].grad.dim() > 1] + [m for m in members if m[0].grad.dim() <= 1])
            n_mat = sum(1 for p, _ in members if p.grad.dim() > 1)
            params = [p for p, _ in members]
            grads = [-p.grad if group["maximize"] else p.grad for p in params]
            e1 = torch.finfo(dtype).eps if eps1 is None else eps1
            weight = t ** group["beta2_decay"]  # 1 - beta2_t
            rho = min(lr, 1 / (t ** 0.5))
            alpha = _rms(params).clamp_min(eps2) * rho
            if group["weight_decay"] != 0:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            updates = self._matrix_estimates([s for _, s in members[:n_mat]], grads[:n_mat], weight, e1)
            updates += self._vector_estimates([s for _, s in members[n_mat:]], grads[n_mat:], weight)
            torch._foreach_clamp_min_(updates, e1 * e1)
            torch._foreach_rsqrt_(updates)
            torch._foreach_mul_(updates, grads)
            denom = (_rms(updates) / group["d"]).clamp_min(1.0)
            scale = -alpha / denom
            torch._foreach_mul_(updates, list(scale.unbind()))
            torch._foreach_add_(params, updates)

    @staticmethod
    def _matrix_estimates(states: list[dict], grads: list[torch.Tensor], weight: float, eps1: float) -> list:
        """Factored second moments: R, C lerped towards the mean squared gradient of each row and column;
        the estimates R C / mean(R), one tensor each."""
        if not grads:
            return []
        row_vars, col_vars = [s["row_var"] for s in states], [s["col_var"] for s in states]
        for dim, moments in ((-1, row_vars), (-2, col_vars)):
            means = [torch.linalg.vector_norm(g, dim=dim, keepdim=True) for g in grads]
            torch._foreach_mul_(means, means)
            torch._foreach_div_(means, [g.size(dim) for g in grads])
            torch._foreach_lerp_(moments, means, weight)
        estimates = [r @ c for r, c in zip(row_vars, col_vars)]
        row_means = [r.mean(dim=-2, keepdim=True) for r in row_vars]
        torch._foreach_clamp_min_(row_means, eps1)
        torch._foreach_div_(estimates, row_means)
        return estimates

    @staticmethod
    def _vector_estimates(states: list[dict], grads: list[torch.Tensor], weight: float) -> list:
        """Unfactored second moments of vectors, lerped towards g^2; the estimates are copies."""
        if not grads:
            return []
        variances = [s["variance"] for s in states]
        torch._foreach_lerp_(variances, torch._foreach_mul(grads, grads), weight)
        return [v.clone() for v in variances]
