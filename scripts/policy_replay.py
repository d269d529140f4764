"""Cache policies against Belady's offline optimum, replayed on the same recorded active sets.

Runs the budgeted engine (predictor or oracle mode) over held-out prompts, records each layer's needed
neurons per decoded token, then replays them through every policy at the planned per-layer capacities.

    python scripts/policy_replay.py BUNDLE [--budget 50%] [--mode predictor] [--prompts 2] [--tokens 128]
"""

import argparse

from flashllm.engine.cache import POLICIES, belady, replay
from flashllm.engine.flash_model import FlashModel, FlashSettings
from flashllm.engine.generate import score
from flashllm.measure.bench import BenchSettings, make_prompts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--mode", default="predictor", choices=["predictor", "oracle"])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--window", type=int, default=4)
    args = parser.parse_args()
    settings = BenchSettings(prompts=args.prompts, prompt_tokens=args.prompt_tokens, tokens=args.tokens)
    flash = FlashModel.open(args.bundle, args.budget, FlashSettings(mode=args.mode, window=args.window),
                            args.prompt_tokens + args.tokens, args.prompt_tokens)
    bundle = flash.bundle
    L, n_ff = bundle.config.num_hidden_layers, bundle.spec.n_ff
    traces = [[] for _ in range(L)]
    for prompt in make_prompts(bundle.folder, settings):
        flash.ffn.record_trace()
        score(flash.model, prompt["prompt"], prompt["continuation"])
        for layer in range(L):
            traces[layer] += flash.ffn.trace[layer][1:]  # decode steps only (the first entry is the prefill)
    steps = len(traces[0])
    needed = sum(len(s) for t in traces for s in t) / (steps * L * n_ff)
    caps = flash.plan.capacities
    print(f"{bundle.manifest['source']['name']}, budget {args.budget}, mode {args.mode}, {steps} decode steps; "
          f"cache {100 * flash.plan.cache_share:.1f}% of the FFN; needed per token {100 * needed:.1f}% of the FFN")
    print(f"{'policy':10} {'share of FFN read per token':>28} {'x fewer than naive':>20}")
    rows = {policy: sum(replay(traces[l], caps[l], n_ff, policy, args.window) for l in range(L))
            for policy in POLICIES}
    rows["belady"] = sum(belady(traces[l], caps[l], n_ff) for l in range(L))
    rows["no cache"] = sum(len(s) for t in traces for s in t)
    for name, misses in rows.items():
        share = misses / (steps * L * n_ff)
        print(f"{name:10} {share:28.3f} {1 / share if share else float('inf'):20.1f}")


if __name__ == "__main__":
    main()
