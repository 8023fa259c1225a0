"""Dry-run several meshes for one model and print a markdown table (how launch/README.md's tables were made).

    python launch/plan_meshes.py --config 8x7b --topology v5e:2x4 --batch 8 --max_seq_len 4096 \
        --prompt_len 1024 --mesh expert=8 --mesh expert=4,tensor=2

With --topology each mesh is compiled by the TPU compiler for that slice
(libtpu, the `tpu` extra; no TPU needed) and the table shows its peak bytes
per device and the roofline estimates. Without it each mesh is planned on
virtual CPU devices (float32 temporaries: an upper bound; no speed), in a
fresh process with as many devices as it needs.
"""

import argparse
import json
import time

from mixtral_jax import plan, topology

GIB = 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="preset or config.json path")
    parser.add_argument("--mesh", action="append", required=True, help="mesh spec; repeat for several")
    parser.add_argument("--topology", default=None, help="TPU slice, e.g. v5e:2x4 (default: virtual CPU devices)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max_seq_len", type=int, default=None)
    parser.add_argument("--prompt_len", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device_memory_gb", type=float, default=None,
                        help="GiB per device (default with --topology: the chip's HBM)")
    parser.add_argument("--json", action="store_true", help="one JSON line per mesh instead of a table")
    args = parser.parse_args()

    tpu = args.topology is not None
    if not args.json:
        if tpu:
            print("| mesh | params | KV cache | temp prefill / decode | peak | fits | decode ms/step (bound) "
                  "| decode collectives MB | prefill tokens/s |")
            print("|---|---|---|---|---|---|---|---|---|")
        else:
            print("| mesh | params | KV cache | temp prefill / decode | peak (upper bound) | fits |")
            print("|---|---|---|---|---|---|")
    for spec in args.mesh:
        t0 = time.perf_counter()
        r = plan.dry_run(args.config, spec, batch=args.batch, max_seq_len=args.max_seq_len,
                         prompt_len=args.prompt_len, dtype=args.dtype, device_memory_gb=args.device_memory_gb,
                         topology=args.topology)
        r["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        g = lambda b: f"{b / GIB:.2f}"
        fits = "" if r["fits"] is None else ("yes" if r["fits"] else "**no**")
        refused = [r[s]["does_not_fit"] for s in ("prefill", "decode") if "does_not_fit" in r[s]]
        temps = "—" if refused else (f"{g(r['prefill']['temp_bytes_per_device'])} / "
                                     f"{g(r['decode']['temp_bytes_per_device'])}")
        # A program over the chip's usable HBM does not compile: the compiler's need and what it has.
        peak = g(r["peak_bytes_per_device"]) + (
            f" (compiler: {g(refused[0]['available_bytes_per_device'])} usable)" if refused else "")
        row = (f"| `{spec}` | {g(r['params_bytes_per_device'])} | {g(r['kv_cache_bytes_per_device'])} | "
               f"{temps} | {peak} | {fits} |")
        if tpu and refused:
            row += " — | — | — |"
        elif tpu:
            row += (f" {r['est_decode_step_s'] * 1e3:.1f} ({r['decode']['bound']}) | "
                    f"{r['decode_collective_bytes_per_device'] / 1e6:.1f} | {r['est_prefill_tokens_per_s']:,.0f} |")
        print(row, flush=True)


if __name__ == "__main__":
    main()
