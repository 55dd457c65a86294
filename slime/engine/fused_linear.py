"""Projections that read the same input, computed by one matrix product in the served model.

A decoder layer's query, key and value projections (and its MLP's gate and up projections) read the same hidden
states. Three small matrix products cost three launches and run the GPU at a fraction of its width at decode batch
sizes; one product over the concatenated weights does the same arithmetic at once. The model's code stays as it is:
each projection becomes a `LinearSlice` that returns its columns of the shared product, computed by whichever slice
of the group is called first with a given input and dropped once every slice has read it. A slice called with an
input the product was not computed for computes it again, so the result never depends on the order or number of
calls, only the speed does.

The group's weight [sum of out_features, in_features] is the only storage; the engine's weight updates address the
original names (`...q_proj.weight`) through `aliases`, as row views of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# attribute names of projections that read the same input, in the order their rows are stacked
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """The stacked weight [sum(out), in] (and bias) of a group of linear layers; `part` returns one layer's output."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
            has_bias = linears[0].bias is not None
            self.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False) if has_bias else None
        self.parts = len(linears)
        self._out: torch.Tensor | None = None  # the product for input _src, until every part has read it
        self._src: torch.Tensor | None = None
        self._reads = 0

    def part(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of x @ weight.T + bias, x [..., in]."""
        if self._src is not x:
            self._out, self._src, self._reads = F.linear(x, self.weight, self.bias), x, 0
        out = self._out[..., start:stop]
        self._reads += 1
        if self._reads == self.parts:
            self._out, self._src, self._reads = None, None, 0
        return out


class LinearSlice(nn.Module):
    """Stands in for one linear layer of a `FusedLinear` group: the same output, from the group's product."""

    def __init__(self, group: FusedLinear, start: int, stop: int, in_features: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the group's weight is named once, by its owner
        self.start, self.stop = start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(x, self.start, self.stop)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows {self.start}:{self.stop}"


def fuse_projections(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Replace every group of `GROUPS` linear layers of one module (same input size, dtype and device, all with or all
    without bias) by slices of one `FusedLinear`, registered on that module as `fused_<names>`. Returns the aliases:
    each replaced parameter's name -> (the fused parameter's name, first row, end row)."""
    aliases: dict[str, tuple[str, int, int]] = {}
    for prefix, module in list(model.named_modules()):
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            first = linears[0]
            if any(
                (m.in_features, m.weight.dtype, m.weight.device, m.bias is None)
                != (first.in_features, first.weight.dtype, first.weight.device, first.bias is None)
                for m in linears
            ):
                continue
            group = FusedLinear(linears)
            owner = "fused_" + "_".join(n.removesuffix("_proj") for n in names)
            module.add_module(owner, group)
            base = f"{prefix}." if prefix else ""
            start = 0
            for name, m in zip(names, linears, strict=True):
                stop = start + m.out_features
                setattr(module, name, LinearSlice(group, start, stop, m.in_features))
                aliases[f"{base}{name}.weight"] = (f"{base}{owner}.weight", start, stop)
                if m.bias is not None:
                    aliases[f"{base}{name}.bias"] = (f"{base}{owner}.bias", start, stop)
                start = stop
    return aliases
