"""Analytic costs of dense vs gamma-MoD: matmul FLOPs of a forward from the tokens each layer
processed, and the KV-cache bytes of a generation. Used by the demo's report and by
``python -m gmod_ext.bench model`` (its FLOPs-bound column)."""
from __future__ import annotations


def arch_of(model) -> dict:
    """The shapes :func:`forward_flops` and :func:`kv_estimate` need, from a Hugging Face model:
    D, Hq, Hk, d, I, V, L of the decoder stack (``config.text_config`` for a multimodal model), plus
    the vision tower's when there is one."""
    tc = getattr(model.config, "text_config", None) or model.config
    D = int(tc.hidden_size)
    Hq = int(tc.num_attention_heads)
    Hk = int(getattr(tc, "num_key_value_heads", None) or Hq)
    d = int(getattr(tc, "head_dim", None) or D // Hq)
    # the MLP width: Llama's name, GPT-2's (None: 4 D), OPT / XGLM's
    I = next((int(v) for v in (getattr(tc, n, None) for n in ("intermediate_size", "n_inner", "ffn_dim"))
              if isinstance(v, int)), 4 * D)
    V = int(model.get_input_embeddings().num_embeddings)
    L = int(tc.num_hidden_layers)
    a = dict(D=D, Hq=Hq, Hk=Hk, d=d, I=I, V=V, L=L, mlp_mats=_mlp_matrices(model))
    vc = getattr(model.config, "vision_config", None)
    if vc is not None:
        a["vision"] = dict(D=int(vc.hidden_size), I=int(vc.intermediate_size), L=int(vc.num_hidden_layers),
                           n=(int(vc.image_size) // int(vc.patch_size)) ** 2, p=int(vc.patch_size))
    return a


def _mlp_matrices(model) -> int:
    """D x I matrices in the first decoder layer's MLP: 3 for a gated MLP (Llama's ``gate_proj``, Phi-3's
    ``gate_up_proj``), else 2 (GPT-2, OPT, GPT-NeoX: up and down)."""
    try:
        from ._hf import find_decoder

        layer = find_decoder(model).layers[0]
    except (TypeError, IndexError):
        return 3
    names = {n.rsplit(".", 1)[-1] for n, _ in layer.named_modules()}
    return 3 if names & {"gate_proj", "gate_up_proj", "w1", "w3"} or not names & {"fc1", "c_fc", "up_proj",
                                                                                   "dense_h_to_4h", "fc_in"} else 2


def layer_flops(a: dict, n: int) -> float:
    """Matmul FLOPs of one decoder layer on ``n`` tokens of one row: q/k/v/o projections, causal
    attention (n(n+1)/2 query-key pairs: QK^T and PV), the MLP (3 matmuls gated, else 2)."""
    D, Hq, Hk, d, I = a["D"], a["Hq"], a["Hk"], a["d"], a["I"]
    proj = 2.0 * n * (D * Hq * d + 2 * D * Hk * d + Hq * d * D)
    attn = 4.0 * Hq * d * n * (n + 1) / 2.0
    mlp = 2.0 * n * a.get("mlp_mats", 3) * D * I
    return proj + attn + mlp


def vision_flops(a: dict, rows: int) -> float:
    """Vision tower (CLIP: patch embedding + layers on patches + CLS, full attention) + the LLaVA
    projector (2 linears) for ``rows`` images; the same for dense and gamma-MoD."""
    v = a.get("vision")
    if not v:
        return 0.0
    Dv, Iv, Lv, npatch, p = v["D"], v["I"], v["L"], v["n"], v["p"]
    n = npatch + 1
    per = 2.0 * npatch * 3 * p * p * Dv
    per += Lv * (2.0 * n * (4 * Dv * Dv + 2 * Dv * Iv) + 4.0 * Dv * n * n)
    per += 2.0 * npatch * (Dv * a["D"] + a["D"] * a["D"])
    return rows * per


def forward_flops(a: dict, tokens: list[int], kept: dict[int, list[int]], with_lm_head: bool = True) -> dict:
    """Analytic matmul FLOPs of one forward of a batch.

    ``tokens[b]``: non-padding tokens of row b (what a dense layer processes; padding is not
    counted); ``kept[layer][b]``: tokens that MoD layer ``layer`` processed in row b (its router,
    ``Linear(D, 2)`` on every token, is added). Returns per-layer and total numbers for dense and
    gamma-MoD.
    """
    dense_layers, mod_layers = [], []
    for li in range(a["L"]):
        dl = sum(layer_flops(a, n) for n in tokens)
        dense_layers.append(dl)
        if li in kept:
            ml = sum(layer_flops(a, n) for n in kept[li]) + sum(2.0 * n * a["D"] * 2 for n in tokens)
        else:
            ml = dl
        mod_layers.append(ml)
    head = 2.0 * sum(tokens) * a["D"] * a["V"] if with_lm_head else 0.0
    vis = vision_flops(a, len(tokens))
    dense = sum(dense_layers) + head + vis
    mod = sum(mod_layers) + head + vis
    return {"dense": dense, "gmod": mod, "ratio": mod / dense if dense else float("nan"),
            "decoder_dense": sum(dense_layers), "decoder_gmod": sum(mod_layers),
            "decoder_ratio": sum(mod_layers) / sum(dense_layers) if sum(dense_layers) else float("nan"),
            "lm_head": head, "vision": vis, "per_layer_dense": dense_layers, "per_layer_gmod": mod_layers}




def kv_estimate(a: dict, B: int, T: int, esize: int, mod_tokens: dict[int, list[int]]) -> dict:
    """Analytic KV memory after generation: a dense layer holds ``B x T`` positions (as a dense
    Hugging Face cache does, padding included); a MoD layer holds only the tokens it processed,
    laid out per row up to the longest row (``B x max_b kept_b``)."""
    per_tok = 2 * a["Hk"] * a["d"] * esize
    layers = []
    for li in range(a["L"]):
        dense_b = B * T * per_tok
        if li in mod_tokens:
            toks = [int(t) for t in mod_tokens[li]]
            held = max(toks) if toks else 0
            layers.append({"layer": li, "kind": "mod", "tokens": toks, "bytes": B * held * per_tok,
                           "used_bytes": sum(toks) * per_tok, "dense_bytes": dense_b})
        else:
            layers.append({"layer": li, "kind": "dense", "tokens": [T] * B, "bytes": dense_b, "used_bytes": dense_b,
                           "dense_bytes": dense_b})
    total = sum(x["bytes"] for x in layers)
    used = sum(x["used_bytes"] for x in layers)
    dense = sum(x["dense_bytes"] for x in layers)
    return {"layers": layers, "total_bytes": total, "used_bytes": used, "dense_equivalent_bytes": dense,
            "ratio": total / dense if dense else float("nan"), "used_ratio": used / dense if dense else float("nan"),
            "seq_len": T, "batch": B, "estimated": True}


