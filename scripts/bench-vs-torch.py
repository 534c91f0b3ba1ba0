#!/usr/bin/env python3
"""pat's CPU decode against transformers + torch on the same random model, the same cores, f32.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch transformers safetensors
    /tmp/tv/bin/python scripts/bench-vs-torch.py [--pat target/release/pat] [--threads 2]

Makes a random-weight model of a real shape with `pat init-model` (default: SmolLM2-135M dims,
`--preset smollm-135m-shape`), then for each batch size times decode only (after prefill), pat
and torch interleaved run by run, and prints the median decode tokens/s of each and their ratio.

- pat: `pat bench one-batch` (its `median_decode_latency`) with PAT_THREADS = --threads, world =
  --threads ranks at tp 1 (data-parallel replicas; at batch 1 only one is busy and takes every
  thread) and one rank alone (its GEMMs and attention split over every thread).
- torch: `AutoModelForCausalLM` in f32 with `torch.set_num_threads(--threads)`, one prefill with
  the KV cache, then one forward per decode step on the last token (greedy), each step timed;
  the median step.

Timing belongs to a quiet machine: the script prints the load average before it starts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def pat_decode(pat, model, world, batch, input_len, output_len, threads):
    env = dict(os.environ, PAT_THREADS=str(threads))
    out = subprocess.run(
        [pat, "bench", "one-batch", "--model", model, "--world", str(world), "--tp", "1",
         "--batch-size", str(batch), "--input-len", str(input_len),
         "--output-len", str(output_len)],
        check=True, capture_output=True, text=True, env=env).stdout
    rec = json.loads(out.strip().splitlines()[-1])
    return rec["median_decode_latency"]


def torch_decode(model, batch, input_len, output_len, threads, seed):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    m = torch_decode.cache.get(model)
    if m is None:
        m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
        m.eval()
        torch_decode.cache[model] = m
    vocab = m.config.vocab_size
    ids = torch.randint(3, vocab, (batch, input_len))
    steps = []
    with torch.inference_mode():
        out = m(ids, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(output_len - 1):
            t0 = time.perf_counter()
            out = m(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
    return statistics.median(steps)


torch_decode.cache = {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pat", default="target/release/pat")
    ap.add_argument("--model", help="model directory (default: a random one made here)")
    ap.add_argument("--preset", default="smollm-135m-shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    a = ap.parse_args()
    if not os.access(a.pat, os.X_OK):
        sys.exit(f"bench-vs-torch: no pat binary at {a.pat} (cargo build --release)")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench-vs-torch: {e}; pip install torch transformers safetensors")
    tmp = tempfile.TemporaryDirectory()
    model = a.model
    if model is None:
        model = os.path.join(tmp.name, "m")
        subprocess.run([a.pat, "init-model", "--preset", a.preset, "--out", model], check=True,
                       capture_output=True)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; model {model}",
          file=sys.stderr)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    runners = {
        f"pat world {a.threads}": lambda b: pat_decode(a.pat, model, a.threads, b, a.input_len,
                                                       a.output_len, a.threads),
        "pat world 1": lambda b: pat_decode(a.pat, model, 1, b, a.input_len, a.output_len,
                                            a.threads),
        f"torch {a.threads} threads": lambda b: torch_decode(model, b, a.input_len, a.output_len,
                                                             a.threads, 0),
    }
    times = {(n, b): [] for n in runners for b in batches}
    for run in range(a.runs):
        for b in batches:
            for n, f in runners.items():
                times[(n, b)].append(f(b))
                print(f"run {run + 1}/{a.runs} batch {b}: {n} {1e3 * times[(n, b)][-1]:.2f} ms/step",
                      file=sys.stderr)
    rows = []
    for b in batches:
        t_torch = statistics.median(times[(f"torch {a.threads} threads", b)])
        for n in runners:
            t = statistics.median(times[(n, b)])
            spread = (max(times[(n, b)]) - min(times[(n, b)])) / t
            rows.append({"runner": n, "batch": b, "ms_per_step": 1e3 * t, "tok_s": b / t,
                         "vs_torch": t_torch / t, "spread": spread})
    if a.json:
        print(json.dumps({"threads": a.threads, "input_len": a.input_len,
                          "output_len": a.output_len, "runs": a.runs, "rows": rows}))
        return
    print(f"{'runner':<18} {'batch':>5} {'ms/step':>9} {'tok/s':>8} {'vs torch':>9} {'spread':>7}")
    for r in rows:
        print(f"{r['runner']:<18} {r['batch']:>5} {r['ms_per_step']:>9.2f} {r['tok_s']:>8.1f} "
              f"{r['vs_torch']:>8.2f}x {100 * r['spread']:>6.1f}%")


if __name__ == "__main__":
    main()
