"""The float network equivalent to an int8 graph, as an ordinary `torch.nn.Module` trained with autograd.

Weights are dequantized (w * w.scale, b * x.scale * w.scale), each activation is clamped to the real range its
int8 tensor can represent (ReLU6 for the folded-ReLU6 layers), and the classifier is a float linear layer. This is
what "PyTorch fp32 full fine-tuning" means in our benchmarks: the same function, in cloud-framework form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from microtrain.ir.graph import Graph
from microtrain.ir.ops import conv_pads


def _real_range(t, attrs: dict | None = None) -> tuple[float, float]:
    """The real interval an int8 tensor covers (within a fused activation's clamp act_min/act_max, if any)."""
    lo, hi = (attrs or {}).get("act_min", -128), (attrs or {}).get("act_max", 127)
    return float((lo - t.zero) * t.scale), float((hi - t.zero) * t.scale)


class FloatNet(nn.Module):
    def __init__(self, g: Graph, num_classes: int):
        super().__init__()
        self.g = g
        self.convs = nn.ModuleDict()
        for op in g.ops:
            if op.kind != "conv2d":
                continue
            x, w, b = (g.tensors[n] for n in op.inputs)
            t, b_, left, r = conv_pads(op.attrs)
            sym = (t, left) == (b_, r) and t == left  # else the input is padded explicitly in forward
            conv = nn.Conv2d(x.shape[0], w.shape[0], w.shape[2], op.attrs["stride"], t if sym else 0,
                             groups=op.attrs["groups"])
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w.data.astype("float32") * w.scale[:, None, None, None]))
                conv.bias.copy_(torch.from_numpy(b.data.astype("float32") * w.scale * float(x.scale)))
            self.convs[op.name.replace(".", "_")] = conv
        pooled = g.ops[-1].inputs[0]
        self.head = nn.Linear(g.tensors[pooled].shape[0], num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: int8 images [N, 3, H, W] (the same input the int8 graph takes)."""
        g = self.g
        inp = g.tensors[g.inputs[0]]
        env = {g.inputs[0]: (x.to(torch.float32) - inp.zero) * float(inp.scale)}
        for op in g.ops[:-1]:
            y = g.tensors[op.outputs[0]]
            if op.kind == "conv2d":
                t, b, left, r = conv_pads(op.attrs)
                xin = env[op.inputs[0]]
                if not ((t, left) == (b, r) and t == left):
                    xin = F.pad(xin, (left, r, t, b))
                v = self.convs[op.name.replace(".", "_")](xin)
            elif op.kind == "add":
                v = env[op.inputs[0]] + env[op.inputs[1]]
            elif op.kind == "avgpool":
                env[op.outputs[0]] = env[op.inputs[0]].mean(dim=(2, 3))
                continue
            else:
                raise NotImplementedError(op.kind)
            env[op.outputs[0]] = torch.clamp(v, *_real_range(y, op.attrs))
        return self.head(env[g.ops[-1].inputs[0]])
