#!/usr/bin/env python3
"""How much a GRPO batch's finished siblings tell about its live sequences' remaining lengths.

An offline check of the remaining-length estimator (src/policy/remaining.rs), no simulator
involved. For each trace (`pat trace gen --kind grpo ... --out t.jsonl`) and each depth of the
tail (live = the longest 50% / 25% / 10% of the batch, every sequence having generated g tokens,
as in a lockstep rollout), it compares three ways to give each live sequence an estimate:

  A  pat's estimator: the strata of E[R - g | R > g] over the batch's lengths, dealt longest first
     to the sequences with the most live siblings (ties at random);
  B  the same strata dealt in the order of a Gaussian-copula posterior mean that also reads the
     finished siblings' exact lengths (normal scores of the batch's ranks; sibling correlation
     fitted on the batch's groups; live siblings censored at g);
  R  the strata dealt at random;

and reports the rank correlation (Spearman) of each with the true remaining lengths and what
placing the live set on R replicas by longest-processing-time on the estimates costs against
placing it on the true lengths. The cost proxy: a replica runs until its longest sequence ends,
each step costing a + b x (sequences still live on it), b / a = 0.1 (a decode step's weight read
against one sequence's KV and host cost); the node ends with its slowest replica.

Usage: scripts/estimate-information.py t1.jsonl [t2.jsonl ...]   (stdlib only)
"""
import bisect
import json
import math
import random
import sys
from collections import Counter, defaultdict
from statistics import NormalDist

N = NormalDist()


def strata(sorted_lens, g, k):
    """Means of k equal-probability strata of {R - g | R > g}, longest first (as remaining.rs)."""
    res = [r - g for r in sorted_lens if r > g]
    m = len(res)
    if m == 0:
        return [1.0] * k
    pref = [0.0]
    for x in res:
        pref.append(pref[-1] + x)

    def big_f(u):
        pos = u * m
        j = min(int(math.floor(pos)), m)
        frac, nxt = (pos - j, res[j]) if j < m else (0.0, 0.0)
        return (pref[j] + frac * nxt) / m

    return [max(1.0, k * (big_f((i + 1) / k) - big_f(i / k))) for i in range(k)][::-1]


def copula(sorted_lens, lens, groups):
    n = len(sorted_lens)

    def z(length):
        lo, hi = bisect.bisect_left(sorted_lens, length), bisect.bisect_right(sorted_lens, length)
        return N.inv_cdf(((lo + hi) / 2 + 0.5) / (n + 1))

    def z_above(g):
        return N.inv_cdf((bisect.bisect_right(sorted_lens, g) + 0.5) / (n + 1))

    zs = [z(x) for x in lens]
    mu = sum(zs) / n
    var = sum((x - mu) ** 2 for x in zs) / n
    by_group = defaultdict(list)
    for zi, gr in zip(zs, groups):
        by_group[gr].append(zi - mu)
    num = cnt = 0
    for v in by_group.values():
        s = sum(v)
        num += s * s - sum(x * x for x in v)
        cnt += len(v) * (len(v) - 1)
    rho = min(0.95, max(0.01, num / cnt / var))
    return z, z_above, rho


def posterior_mean_z(finished_z, n_live, c, rho, rng, samples=400):
    """E[z | finished siblings exact, n_live siblings (itself included) above c]."""
    s = math.sqrt(1 - rho)
    prec = 1 / rho + len(finished_z) / (1 - rho)
    mean, sd = sum(finished_z) / (1 - rho) / prec, math.sqrt(1 / prec)
    tot = wsum = 0.0
    for _ in range(samples):
        u = rng.gauss(mean, sd)
        tail = max(1e-300, 1 - N.cdf((c - u) / s))
        w = tail**n_live
        tot += w * (u + s * N.pdf((c - u) / s) / tail)
        wsum += w
    return tot / wsum


def lpt(est, replicas):
    load, count, at = [0.0] * replicas, [0] * replicas, [0] * len(est)
    for i in sorted(range(len(est)), key=lambda i: -est[i]):
        r = min(range(replicas), key=lambda r: (load[r], count[r]))
        at[i], load[r], count[r] = r, load[r] + est[i], count[r] + 1
    return at


def makespan(rem, at, replicas, a=1.0, b=0.1):
    worst = 0.0
    for r in range(replicas):
        mine = sorted(x for x, p in zip(rem, at) if p == r)
        t, prev = 0.0, 0
        for k, x in enumerate(mine):
            t += (x - prev) * (a + b * (len(mine) - k))
            prev = x
        worst = max(worst, t)
    return worst


def spearman(x, y):
    def ranks(v):
        out = [0] * len(v)
        for k, i in enumerate(sorted(range(len(v)), key=lambda i: v[i])):
            out[i] = k
        return out

    rx, ry = ranks(x), ranks(y)
    m = (len(x) - 1) / 2
    return sum((a - m) * (b - m) for a, b in zip(rx, ry)) / sum((a - m) ** 2 for a in rx)


def main(paths):
    print("trace replicas live g spearman(A B R) cost-vs-true(A B R)")
    totals = defaultdict(list)
    for path in paths:
        rows = [json.loads(line) for line in open(path)]
        lens, groups = [r["response_len"] for r in rows], [r["group"] for r in rows]
        sl = sorted(lens)
        z, z_above, rho = copula(sl, lens, groups)
        for frac in (0.5, 0.25, 0.1):
            g = sorted(lens, reverse=True)[max(2, int(len(lens) * frac))]
            live = [i for i, x in enumerate(lens) if x > g]
            rem = [lens[i] - g for i in live]
            live_in = Counter(groups[i] for i in live)
            st = strata(sl, g, len(live))
            rng = random.Random(0)

            def dealt(order):
                est = [0.0] * len(live)
                for j, s in zip(order, st):
                    est[j] = s
                return est

            a = dealt(sorted(range(len(live)), key=lambda j: (-live_in[groups[live[j]]], rng.random())))
            post = [
                posterior_mean_z(
                    [z(lens[x]) for x, gr in enumerate(groups) if gr == groups[i] and lens[x] <= g],
                    live_in[groups[i]],
                    z_above(g),
                    rho,
                    rng,
                )
                for i in live
            ]
            b = dealt(sorted(range(len(live)), key=lambda j: -post[j]))
            r = dealt(sorted(range(len(live)), key=lambda j: rng.random()))
            for reps in (8, 16):
                best = makespan(rem, lpt(rem, reps), reps)
                sp = [spearman(e, rem) for e in (a, b, r)]
                co = [makespan(rem, lpt(e, reps), reps) / best for e in (a, b, r)]
                for k, v in zip(("spA", "spB", "spR", "coA", "coB", "coR"), sp + co):
                    totals[k].append(v)
                print(f"{path} {reps} {len(live)} {g} rho={rho:.2f} "
                      + " ".join(f"{v:.2f}" for v in sp) + "  " + " ".join(f"{v:.3f}" for v in co))
    print("mean over rows: spearman A %.3f B %.3f R %.3f; cost vs true A %.3f B %.3f R %.3f"
          % tuple(sum(totals[k]) / len(totals[k]) for k in ("spA", "spB", "spR", "coA", "coB", "coR")))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
