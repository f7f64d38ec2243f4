"""Engine vs transformers `generate` on CPU: the same 64 requests on the same tiny model.

64 requests with mixed prompt (8..256) and output (16..128) lengths from a fixed seed, greedy,
EOS ignored so that every request produces exactly its output length. The engine runs them with
continuous batching at max_num_seqs=32; transformers runs them 32 at a time (left-padded, each
batch generating up to its longest request). Output tokens/s counts the requested tokens only.
Each side runs in its own process so that its peak RSS is its own.

    python bench/engine.py [--model DIR] [--requests 64] [--concurrency 32]
    python bench/engine.py --structured   # the engine with a JSON schema vs without

With --structured the engine runs the workload twice, without and with structured output (every
request bound to a JSON schema: an object with one string of at least 4096 characters, so that
each request still runs to its output length), and reports the ratio of output tokens/s.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(8, 256))], rng.randint(16, 128))
        for _ in range(n)
    ]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LONG_STRING_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 4096}},
    "required": ["text"],
}


def run_engine(
    model: Path, reqs: list[tuple[list[int], int]], concurrency: int, structured: bool = False
) -> dict:
    from mell.common.config import EngineConfig
    from mell.common.sampling import SamplingParams
    from mell.workerd.engine.engine import Engine

    # EngineConfig defaults (block 16, max_num_batched_tokens 512) except the concurrency
    engine = Engine(EngineConfig(model=str(model), max_num_seqs=concurrency))

    grammar = None
    if structured:
        import llguidance

        grammar = llguidance.grammar_from("json_schema", json.dumps(LONG_STRING_SCHEMA))

    def go(batch: list[tuple[list[int], int]], tag: str) -> tuple[int, int]:
        for i, (prompt, n) in enumerate(batch):
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, grammar=grammar)
            engine.add_request(f"{tag}{i}", prompt, params)
        tokens = steps = 0
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            steps += 1
        return tokens, steps

    go(reqs[:4], "warm")
    start = time.perf_counter()
    tokens, steps = go(reqs, "r")
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "steps": steps, "peak_rss_mb": peak_rss_mb()}


def run_transformers(model: Path, reqs: list[tuple[list[int], int]], concurrency: int) -> dict:
    import torch
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    lm.generation_config.eos_token_id = None  # ignore EOS, as the engine run does
    lm.generation_config.pad_token_id = 0

    def go(batch: list[tuple[list[int], int]]) -> tuple[int, int]:
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(n for _, n in batch)
        with torch.inference_mode():
            out = lm.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False
            )
        assert out.shape[1] == width + new
        return sum(n for _, n in batch), new * len(batch)

    go(reqs[:4])
    start = time.perf_counter()
    useful = generated = 0
    for i in range(0, len(reqs), concurrency):
        u, g = go(reqs[i : i + concurrency])
        useful += u
        generated += g
    elapsed = time.perf_counter() - start
    return {
        "tokens": useful,
        "generated_incl_padding": generated,
        "seconds": elapsed,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: a fresh mell-tiny)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads, both sides (default 1)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per side; the best counts")
    parser.add_argument(
        "--structured", action="store_true", help="engine with a JSON schema vs without"
    )
    parser.add_argument(
        "--part", choices=["engine", "engine-json", "transformers"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from mell.common.tiny_model import write_tiny_model

            model = write_tiny_model(Path(tmp) / "mell-tiny", seed=0)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        reqs = workload(args.requests, vocab)
        if args.part:
            import torch

            torch.set_num_threads(args.threads)
            if args.part == "transformers":
                out = run_transformers(model, reqs, args.concurrency)
            else:
                out = run_engine(model, reqs, args.concurrency, args.part == "engine-json")
            print(json.dumps(out))
            return 0
        parts = ["engine", "engine-json" if args.structured else "transformers"]
        runs: dict[str, list[dict]] = {part: [] for part in parts}
        for _ in range(args.repeat):  # interleaved, so that machine noise hits both sides
            for part in runs:
                cmd = [sys.executable, __file__, "--part", part, "--model", str(model)]
                cmd += ["--requests", str(args.requests), "--concurrency", str(args.concurrency)]
                cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[part].append(json.loads(out.strip().splitlines()[-1]))
        results = {part: min(rs, key=lambda r: r["seconds"]) for part, rs in runs.items()}
        spread = {part: [round(r["seconds"], 2) for r in rs] for part, rs in runs.items()}

    if args.structured:
        return report_structured(args, results, spread)
    eng, hf = results["engine"], results["transformers"]
    eng_tps = eng["tokens"] / eng["seconds"]
    hf_tps = hf["tokens"] / hf["seconds"]
    print(
        f"model: {args.model or 'mell-tiny (seed 0)'}; {args.requests} requests, prompts 8..256, "
        f"outputs 16..128 tokens, greedy, concurrency {args.concurrency}, CPU, "
        f"{args.threads} thread(s), best of {args.repeat} (seconds: {spread})"
    )
    print(
        f"engine:       {eng['tokens']} output tokens in {eng['seconds']:.2f} s = "
        f"{eng_tps:,.0f} tok/s ({eng['steps']} steps), peak RSS {eng['peak_rss_mb']:.0f} MiB"
    )
    print(
        f"transformers: {hf['tokens']} output tokens in {hf['seconds']:.2f} s = "
        f"{hf_tps:,.0f} tok/s ({hf['generated_incl_padding']} generated incl. padding), "
        f"peak RSS {hf['peak_rss_mb']:.0f} MiB"
    )
    print(f"ratio engine/transformers: {eng_tps / hf_tps:.2f}x")
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "output_tokens": eng["tokens"],
        "engine_tok_s": round(eng_tps, 1),
        "transformers_tok_s": round(hf_tps, 1),
        "ratio": round(eng_tps / hf_tps, 2),
        "engine_peak_rss_mb": round(eng["peak_rss_mb"], 1),
        "transformers_peak_rss_mb": round(hf["peak_rss_mb"], 1),
    }
    print("RESULT " + json.dumps(result))
    return 0


def report_structured(
    args: argparse.Namespace, results: dict[str, dict], spread: dict[str, list[float]]
) -> int:
    plain, guided = results["engine"], results["engine-json"]
    plain_tps = plain["tokens"] / plain["seconds"]
    guided_tps = guided["tokens"] / guided["seconds"]
    print(
        f"model: {args.model or 'mell-tiny (seed 0)'}; {args.requests} requests, greedy, "
        f"concurrency {args.concurrency}, CPU, {args.threads} thread(s), best of {args.repeat} "
        f"(seconds: {spread})"
    )
    print(f"engine:             {plain['tokens']} tokens, {plain_tps:,.0f} tok/s")
    print(f"engine, JSON schema: {guided['tokens']} tokens, {guided_tps:,.0f} tok/s")
    ratio = guided_tps / plain_tps
    print(f"ratio with/without: {ratio:.2f} (target >= 0.8)")
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "output_tokens": guided["tokens"],
        "plain_tok_s": round(plain_tps, 1),
        "json_schema_tok_s": round(guided_tps, 1),
        "ratio": round(ratio, 2),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
