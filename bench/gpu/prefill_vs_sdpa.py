#!/usr/bin/env python3
"""Prefill through the cascade (kvmem_prefill_bench) against PyTorch SDPA,
measured in the same run on the same GPU (specs/cascade.md § 5).

Baselines, one attention layer of 32 query / 8 KV heads x 128, bf16:
- full causal SDPA over all N tokens (flash kernel);
- the same T-token chunks over a fixed cache of the budget's size, with no
  policy work: without a mask (flash kernel) and with the causal mask inside
  the chunk (a boolean mask, a slower kernel).
K/V are expanded to 32 heads before timing. Every figure is the median of
--repeats timed runs after one warm-up run. Then the kvmem benchmark binary
runs with the same shapes and its RESULT lines are joined into one table.

Usage (on the GPU machine):
  python3 bench/gpu/prefill_vs_sdpa.py --bench ./kvmem_prefill_bench \
      --tokens 131072,524288,1048576 --budgets 16384,65536 --repeats 3
"""
import argparse
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM = 32, 8, 128


def timed(fn, repeats):
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def full_causal(n, repeats):
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16,
                    generator=g)
    k = torch.randn(1, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16,
                    generator=g).repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = torch.randn_like(k)
    result = timed(lambda: F.scaled_dot_product_attention(q, k, v,
                                                          is_causal=True),
                   repeats)
    del q, k, v
    torch.cuda.empty_cache()
    return result


def chunks_over_fixed_cache(n, budget, chunk, masked, repeats):
    g = torch.Generator(device="cuda").manual_seed(budget)
    q = torch.randn(1, HEADS, chunk, DIM, device="cuda", dtype=torch.bfloat16,
                    generator=g)
    k = torch.randn(1, HEADS, budget + chunk, DIM, device="cuda",
                    dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    mask = None
    if masked:  # chunk token i sees the cache and chunk tokens 0..i
        cols = torch.arange(budget + chunk, device="cuda")
        rows = torch.arange(chunk, device="cuda")
        mask = cols[None, :] <= budget + rows[:, None]
    steps = n // chunk

    def run():
        for _ in range(steps):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return timed(run, repeats)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True)
    parser.add_argument("--tokens", default="131072,524288,1048576")
    parser.add_argument("--budgets", default="16384,65536")
    parser.add_argument("--cascades", default="1,4")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default="0",
                        help="kvmem_prefill_bench --kernels: 0 auto, "
                        "1 mma.sync, 2 wgmma (one)")
    args = parser.parse_args()
    tokens = [int(x) for x in args.tokens.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
          flush=True)
    full = {n: full_causal(n, args.repeats) for n in tokens}
    plain, masked = {}, {}
    for budget in budgets:
        for n in tokens:
            plain[n, budget] = chunks_over_fixed_cache(
                n, budget, args.chunk, False, args.repeats)
            masked[n, budget] = chunks_over_fixed_cache(
                n, budget, args.chunk, True, args.repeats)
    torch.cuda.empty_cache()

    ours = {}
    proc = subprocess.run(
        [args.bench, f"--tokens={args.tokens}", f"--budgets={args.budgets}",
         f"--cascades={args.cascades}", f"--chunk={args.chunk}",
         f"--repeats={args.repeats}", f"--kernels={args.kernels}"],
        capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{args.bench} failed: {proc.returncode}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            fields = dict(kv.split("=") for kv in line.split()[1:])
            ours[int(fields["tokens"]), int(fields["budget"]),
                 int(fields["cascades"])] = float(fields["seconds"])

    print()
    print("| tokens | budget | C | kvmem s | SDPA full causal s | x faster "
          "| chunks, no mask s | x | chunks, causal mask s | x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (n, budget, c), s in sorted(ours.items()):
        print(f"| {n} | {budget} | {c} | {s:.3f} | {full[n]:.3f} | "
              f"{full[n] / s:.1f} | {plain[n, budget]:.3f} | "
              f"{plain[n, budget] / s:.2f} | {masked[n, budget]:.3f} | "
              f"{masked[n, budget] / s:.2f} |")
    print("\nx = baseline time / kvmem time (above 1: kvmem is faster). "
          "Goals at 1M: >= 20x full causal with the 16K budget, >= 8x with "
          "64K.")


if __name__ == "__main__":
    main()
