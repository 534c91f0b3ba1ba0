#!/usr/bin/env python3
"""Generate golden reference outputs for `pat` from HuggingFace transformers.

What it makes
-------------
Two tiny random-weight decoder models, each written as a normal HuggingFace
model directory plus a ``golden.json`` with greedy-decoding reference data:

    <out>/llama/   LlamaForCausalLM  (llama3 rope scaling, GQA, untied lm_head)
    <out>/qwen3/   Qwen3ForCausalLM  (q_norm/k_norm, head_dim != hidden/heads,
                                      tied embeddings)

Each directory holds ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32, HF tensor names, written by
``save_pretrained(safe_serialization=True)``) and ``golden.json``::

    {
      "transformers_version", "torch_version", "seed", "model",
      "attn_implementation", "max_new_tokens", "min_margin",
      "prompts": [
        {"input_ids": [...], "output_ids": [...24 new tokens...],
         "first_step_logits": [...vocab...], "last_step_logits": [...vocab...]},
        ...
      ]
    }

Decoding is a plain greedy loop, batch 1, no padding, one full forward pass per
step (``use_cache=False``, no ``generate()``), 24 new tokens, never stopping at
EOS.  ``first_step_logits`` are the last-position logits that chose the first
new token, ``last_step_logits`` the ones that chose the 24th.  Every step's
top-1 logit must beat the top-2 by at least MIN_MARGIN; otherwise the next seed
is tried, so the recorded tokens are robust to summation-order differences
between implementations.

After writing, the script self-checks: each directory is reloaded with
``AutoModelForCausalLM.from_pretrained`` and must reproduce the greedy tokens,
and an independent plain-numpy forward pass (reading only config.json and
model.safetensors) must match HF's first-step logits within 1e-4.

How to run (by hand, not in CI; CPU only, takes well under a minute)
---------------------------------------------------------------------
    python3 -m venv /work/venv-golden          # anywhere outside the repo
    /work/venv-golden/bin/pip install -r scripts/requirements-golden.txt
    /work/venv-golden/bin/python scripts/make_golden.py --out tests/data/golden

Output is deterministic for the pinned versions in
scripts/requirements-golden.txt.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 301  # deliberately not a multiple of 4
MAX_NEW_TOKENS = 24
PROMPT_LENGTHS = (1, 5, 11, 23)
MIN_TOKEN_ID = 3  # prompts avoid pad/bos/eos ids 0..2
MIN_MARGIN = 1e-2  # required top1 - top2 logit gap at every greedy step (logit std ~1.2)
WEIGHT_STD = 0.15  # std for every embedding / linear weight
NORM_STD = 0.2  # RMSNorm weights are 1 + NORM_STD * randn
ATTN_IMPL = "eager"
MAX_SEEDS = 1000


def llama_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        intermediate_size=96,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        # With head_dim 8 and theta 5e5 the wavelengths 2*pi/inv_freq are
        # ~6.3, ~167, ~4443, ~1.2e5.  original_max_position_embeddings=192 puts
        # them in all three llama3 regimes: 6.3 < 192/4 (kept), 48 <= 167 <= 192
        # (smoothly interpolated), 4443 and 1.2e5 > 192 (divided by factor).
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 192,
        },
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        initializer_range=WEIGHT_STD,
        dtype="float32",
    )


def qwen3_config():
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,  # deliberately != hidden_size / num_attention_heads
        intermediate_size=96,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        initializer_range=WEIGHT_STD,
        dtype="float32",
    )


MODELS = {
    "llama": (llama_config, LlamaForCausalLM),
    "qwen3": (qwen3_config, Qwen3ForCausalLM),
}


def build_model(name, seed):
    """Construct the model and randomise all weights from `seed`."""
    make_config, cls = MODELS[name]
    torch.manual_seed(seed)
    config = make_config()
    model = cls._from_config(config, attn_implementation=ATTN_IMPL, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        # named_parameters() yields a tied parameter only once, so the tied
        # qwen3 embed/lm_head stays a single tensor.
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # input/post_attention/final/q/k norms
                p.copy_(1.0 + NORM_STD * torch.randn_like(p))
            else:
                p.normal_(mean=0.0, std=WEIGHT_STD)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for p in model.parameters():
        assert p.dtype == torch.float32
    return model


def make_prompts(seed):
    g = torch.Generator().manual_seed(seed + 12345)
    return [
        torch.randint(MIN_TOKEN_ID, VOCAB, (n,), generator=g).tolist()
        for n in PROMPT_LENGTHS
    ]


@torch.no_grad()
def greedy(model, input_ids, n_new=MAX_NEW_TOKENS):
    """Full-forward greedy loop. Returns (new_ids, per-step logits, min margin)."""
    ids = list(input_ids)
    new_ids, step_logits, min_margin = [], [], math.inf
    for _ in range(n_new):
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        logits = out.logits[0, -1].to(torch.float32)
        top2 = torch.topk(logits, 2)
        margin = float(top2.values[0] - top2.values[1])
        min_margin = min(min_margin, margin)
        nxt = int(top2.indices[0])
        assert nxt == int(torch.argmax(logits))
        ids.append(nxt)
        new_ids.append(nxt)
        step_logits.append(logits.clone())
    return new_ids, step_logits, min_margin


def run_prompts(model, prompts):
    records, min_margin = [], math.inf
    for p in prompts:
        new_ids, logits, m = greedy(model, p)
        min_margin = min(min_margin, m)
        records.append(
            {
                "input_ids": list(p),
                "output_ids": new_ids,
                "first_step_logits": logits[0].tolist(),
                "last_step_logits": logits[-1].tolist(),
            }
        )
    return records, min_margin


def generate(name, out_dir):
    for seed in range(MAX_SEEDS):
        model = build_model(name, seed)
        prompts = make_prompts(seed)
        records, min_margin = run_prompts(model, prompts)
        if min_margin >= MIN_MARGIN:
            break
        print(f"[{name}] seed {seed}: min margin {min_margin:.3g} < {MIN_MARGIN}, next seed")
    else:
        sys.exit(f"[{name}] no seed in range({MAX_SEEDS}) satisfies the margin")

    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    golden = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": seed,
        "model": name,
        "attn_implementation": ATTN_IMPL,
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_margin": min_margin,
        "prompts": records,
    }
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"[{name}] seed {seed}, min margin {min_margin:.4f}, wrote {d}")
    return d


# ---------------------------------------------------------------------------
# Self-checks
# ---------------------------------------------------------------------------


def check_reload(d):
    with open(os.path.join(d, "golden.json")) as f:
        golden = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation=ATTN_IMPL)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    max_diff = 0.0
    for rec in golden["prompts"]:
        new_ids, logits, _ = greedy(model, rec["input_ids"])
        assert new_ids == rec["output_ids"], (d, new_ids, rec["output_ids"])
        for got, want in ((logits[0], rec["first_step_logits"]), (logits[-1], rec["last_step_logits"])):
            max_diff = max(max_diff, float((got - torch.tensor(want)).abs().max()))
    assert max_diff == 0.0, f"{d}: reloaded logits differ by {max_diff}"
    print(f"  reload {d}: greedy tokens reproduced, logits bit-identical")


def np_rmsnorm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + eps))


def np_inv_freq(cfg):
    """RoPE inverse frequencies, including the llama3 scaling rule."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.get("rope_scaling")
    if rs is None:
        return inv, None
    assert rs["rope_type"] == "llama3"
    factor = rs["factor"]
    lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    out, regimes = np.empty_like(inv), []
    for i in range(len(inv)):
        if wl[i] < high_wl:  # high frequency: unchanged
            out[i] = inv[i]
            regimes.append("keep")
        elif wl[i] > low_wl:  # low frequency: slowed down by factor
            out[i] = inv[i] / factor
            regimes.append("div")
        else:  # in between: blend
            s = (old / wl[i] - lo) / (hi - lo)
            out[i] = (1 - s) * inv[i] / factor + s * inv[i]
            regimes.append("smooth")
    return out, regimes


def np_rope(x, pos, inv):
    """x: [seq, heads, hd]; half-rotation pairs (i, i + hd/2) share inv[i]."""
    ang = pos[:, None] * inv[None, :]  # [seq, hd/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def np_forward(d, ids):
    """Independent float64 numpy forward pass; returns last-position logits."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in w
    inv, _ = np_inv_freq(cfg)
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = np_rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, KV, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, KV, hd)
        if qk_norm:  # per head, over head_dim, before rope
            q = np_rmsnorm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = np_rmsnorm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = np_rope(q, pos, inv), np_rope(k, pos, inv)
        att = np.empty((T, H, hd))
        for hh in range(H):
            kvh = hh // (H // KV)  # query head hh uses kv head hh // n_rep
            s = q[:, hh] @ k[:, kvh].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att[:, hh] = s @ v[:, kvh]
        x = x + att.reshape(T, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = np_rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = np_rmsnorm(x, w["model.norm.weight"], eps)
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x[-1] @ lm_head.T


def check_numpy(d):
    with open(os.path.join(d, "golden.json")) as f:
        golden = json.load(f)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    inv, regimes = np_inv_freq(cfg)
    if regimes is not None:
        print(f"  llama3 inv_freq regimes: {regimes}")
    worst = 0.0
    for rec in golden["prompts"]:
        ref = np.array(rec["first_step_logits"])
        got = np_forward(d, rec["input_ids"])
        worst = max(worst, float(np.abs(got - ref).max()))
        assert int(np.argmax(got)) == rec["output_ids"][0]
        # the last step's logits come from prompt + first 23 generated tokens
        full = rec["input_ids"] + rec["output_ids"][:-1]
        ref = np.array(rec["last_step_logits"])
        got = np_forward(d, full)
        worst = max(worst, float(np.abs(got - ref).max()))
        assert int(np.argmax(got)) == rec["output_ids"][-1]
    print(f"  numpy forward {d}: max |logit diff| vs HF = {worst:.2e}")
    assert worst < 1e-4, f"{d}: numpy reference differs from HF by {worst}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/golden", help="output directory")
    args = ap.parse_args()
    torch.set_num_threads(1)  # single-threaded CPU kernels: reproducible summation order
    dirs = [generate(name, args.out) for name in MODELS]
    print("self-check:")
    for d in dirs:
        check_reload(d)
        check_numpy(d)
        for fn in sorted(os.listdir(d)):
            print(f"    {os.path.join(d, fn)}: {os.path.getsize(os.path.join(d, fn))} bytes")


if __name__ == "__main__":
    main()
