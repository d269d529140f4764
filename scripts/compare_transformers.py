"""Decode speed of flashllm's dense engine next to transformers on the same GGUF, prompt and token count.

    python scripts/compare_transformers.py [MODEL] [--tokens 64]
"""

import argparse
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import transformers

    from flashllm.engine.generate import GenerationStats, SamplingSettings, generate, load_dense
    from flashllm.hub import resolve

    path = resolve(args.model)
    ours = load_dense(path)
    ids = ours.tokenizer.encode(args.prompt)
    stats = GenerationStats()
    got = list(generate(ours.model, ids, SamplingSettings(max_tokens=args.tokens, stop_at_eos=False), stats=stats))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = hf.generate(torch.tensor([ids]), max_new_tokens=args.tokens, eos_token_id=None,
                          do_sample=False, pad_token_id=0)
        hf_seconds = time.perf_counter() - start
    same = out[0, len(ids):].tolist() == got
    print(f"model {path.name}, prompt {args.prompt!r}, {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"flashllm dense : {stats.tokens_per_s:6.2f} tokens/s (decode), prefill {stats.prefill_seconds:.2f} s")
    print(f"transformers   : {args.tokens / hf_seconds:6.2f} tokens/s (prefill + decode)")
    print(f"identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
