#!/usr/bin/env python3
"""Hugging Face transformers fp16 on the GPU, for the cuda benchmark (benches/cuda_gpu_check.sh).

Builds a model from a config.json (random weights: speed does not depend on values; nothing is
downloaded), then measures, after a warm-up:
  - prefill: one forward pass over a PREFILL-token prompt (tokens/s = PREFILL / seconds),
  - decode: greedy generation of GEN tokens after a PROMPT-token prompt with the KV cache
    (tokens/s = GEN / seconds of generate minus its prefill).
Prints one JSON object. Usage: hf_transformers_bench.py MODEL_DIR [--prefill 512] [--prompt 16] [--gen 256]
"""
import argparse, json, sys, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=256)
    a = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(a.model_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
    model.eval()
    vocab = cfg.vocab_size

    def sync():
        torch.cuda.synchronize()

    def timed(f, reps=3):
        best = float("inf")
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            f()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    ids_prefill = torch.randint(0, vocab, (1, a.prefill), device="cuda")
    ids_prompt = torch.randint(0, vocab, (1, a.prompt), device="cuda")
    with torch.inference_mode():
        prefill_s = timed(lambda: model(ids_prefill, use_cache=False))
        prompt_s = timed(lambda: model(ids_prompt, use_cache=True))
        gen = dict(max_new_tokens=a.gen, min_new_tokens=a.gen, do_sample=False, use_cache=True,
                   pad_token_id=0)
        gen_s = timed(lambda: model.generate(ids_prompt, **gen), reps=2)
    decode_s = max(gen_s - prompt_s, 1e-9)
    print(json.dumps({
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "prefill_tokens": a.prefill, "prefill_tok_s": a.prefill / prefill_s,
        "prompt_tokens": a.prompt, "gen_tokens": a.gen, "decode_tok_s": a.gen / decode_s,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }))


if __name__ == "__main__":
    sys.exit(main())
