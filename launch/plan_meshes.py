"""Dry-run several meshes for one model and print a markdown table (how launch/README.md's tables were made).

    python launch/plan_meshes.py --config 8x7b --device_memory_gb 16 --batch 8 --max_seq_len 4096 \
        --mesh expert=8 --mesh expert=4,tensor=2

Each mesh is planned by `mixtral_jax.plan.dry_run` (AOT compile on virtual CPU
devices, nothing allocated), in a fresh process with as many devices as it needs.
"""

import argparse
import json
import time

from mixtral_jax import plan

GIB = 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="preset or config.json path")
    parser.add_argument("--mesh", action="append", required=True, help="mesh spec; repeat for several")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max_seq_len", type=int, default=None)
    parser.add_argument("--prompt_len", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device_memory_gb", type=float, default=None, help="GiB per device")
    parser.add_argument("--json", action="store_true", help="one JSON line per mesh instead of a table")
    args = parser.parse_args()

    if not args.json:
        print("| mesh | params | KV cache | temporaries (prefill / decode) | total | fits |")
        print("|---|---|---|---|---|---|")
    for spec in args.mesh:
        t0 = time.perf_counter()
        r = plan.dry_run(args.config, spec, batch=args.batch, max_seq_len=args.max_seq_len,
                         prompt_len=args.prompt_len, dtype=args.dtype, device_memory_gb=args.device_memory_gb)
        r["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        g = lambda key: f"{r[key] / GIB:.2f}"
        fits = "" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
        print(f"| `{spec}` | {g('params_bytes_per_device')} | {g('kv_cache_bytes_per_device')} | "
              f"{g('prefill_temp_bytes_per_device')} / {g('decode_temp_bytes_per_device')} | "
              f"{g('total_bytes_per_device')} | {fits} |", flush=True)


if __name__ == "__main__":
    main()
