"""A deterministic stand-in for the latency table's clocks, with a known cost model.

Every conv (with its BN and ReLU) costs ``OVERHEAD_MS`` plus ``MS_PER_MAC`` per multiply-accumulate;
a whole network costs ``REMAINDER_MS`` plus its convs. That is the model the table assumes (layer
entries plus a remainder pruning leaves unchanged), and per layer it is bilinear in (C_in, C_out),
so the table's bilinear interpolation reproduces it exactly between grid points: a table built and
calibrated on this clock must predict every pruned network's cost to rounding error.

    table = LatencyTable(graph, model, store, timer=clock.time_probe, measure=clock.measure)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunepilot.compression.measure import Latency

MS_PER_MAC = 2e-6
OVERHEAD_MS = 0.01
REMAINDER_MS = 0.3


def layer_ms(c_in: float, c_out: float, h_out: int, w_out: int, kernel: int, batch: int = 1) -> float:
    """The cost model: a dense (groups 1) conv producing ``h_out`` x ``w_out`` outputs."""
    return OVERHEAD_MS + MS_PER_MAC * batch * c_in * c_out * kernel * kernel * h_out * w_out


def conv_ms(conv: nn.Conv2d, batch: int, h_out: int, w_out: int) -> float:
    assert conv.groups == 1 and conv.kernel_size[0] == conv.kernel_size[1]
    return layer_ms(conv.in_channels, conv.out_channels, h_out, w_out, conv.kernel_size[0], batch)


class FakeClock:
    """``time_probe`` for :meth:`LatencyTable.build`, ``measure`` for :meth:`LatencyTable.calibrate`.

    ``timed`` lists the (C_in, C_out, H, W, kernel, stride) of every entry timed, once per call;
    ``burst(call_index)`` may return a factor (> 1) by which one call is slowed, as a neighbour's load would."""

    def __init__(self, burst=None) -> None:  # type: ignore[no-untyped-def]
        self.timed: list[tuple[int, ...]] = []
        self.burst = burst

    def time_probe(self, module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
        conv = module[0]
        assert isinstance(conv, nn.Conv2d)
        b, c_in, h, w = x.shape
        assert c_in == conv.in_channels
        (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
        h_out, w_out = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        self.timed.append((c_in, conv.out_channels, h, w, k, s))
        factor = self.burst(len(self.timed) - 1) if self.burst is not None else 1.0
        return conv_ms(conv, b, h_out, w_out) * factor

    def network_ms(self, model: nn.Module, input_size: int, batch_size: int = 1) -> float:
        total = REMAINDER_MS

        def hook(m: nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            nonlocal total
            total += conv_ms(m, out.shape[0], out.shape[2], out.shape[3])

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        was_training = model.training
        try:
            with torch.inference_mode():
                model.eval()(torch.zeros(batch_size, 3, input_size, input_size))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return total

    def measure(self, models: Sequence[nn.Module], input_size: int, batch_size: int = 1, threads: int | None = 2,
                **_: object) -> list[Latency]:
        out = []
        for m in models:
            ms = self.network_ms(m, input_size, batch_size)
            out.append(Latency(ms, ms, ms, batch_size, threads or 1, 1))
        return out
