"""The demo's report helpers: number formatting, JSON-safe values, and the PNG (ARank per layer,
skip ratio per layer, training loss)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def fmt_flops(f: float) -> str:
    for unit, s in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= s:
            return f"{f / s:.3f} {unit}"
    return f"{f:.0f} FLOP"


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)



def plot_demo(path: str, ranks, mod_layers, skip_per_layer: dict, losses: dict, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    L = len(ranks)
    mod = set(mod_layers)
    fig, axes = plt.subplots(1, 3, figsize=(max(12.0, 0.6 * L + 9), 3.6))
    colors = ["tab:orange" if i in mod else "tab:blue" for i in range(L)]
    ax = axes[0]
    ax.bar(range(L), ranks, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("ARank")
    ax.set_title("ARank per layer")
    ax.legend(handles=[Patch(color="tab:blue", label="dense"), Patch(color="tab:orange", label="MoD")], fontsize=8)
    ax = axes[1]
    vals = [skip_per_layer.get(i, 0.0) for i in range(L)]
    ax.bar(range(L), vals, color=colors)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens skipped")
    ax.set_title("skip ratio per layer (last training step)")
    ax = axes[2]
    for name, ys in losses.items():
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

