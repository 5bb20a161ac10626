#!/usr/bin/env python3
"""The peer side of worker/examples/bench_allreduce.rs: in-place f32 sum
all-reduce with torch.distributed's gloo backend, one process per rank on
127.0.0.1, timed exactly like Tessera's ring.

Per size: `--warmup` untimed iterations, then `--iters` timed ones. Each
timed iteration refills the buffer from a template ((i % 1000) * 0.001 +
rank, the same f32 values as the Rust side), runs a barrier, and times one
dist.all_reduce. An iteration's time is the slowest rank's (an all-reduce
with MAX over the ranks' timings). Then a CPU pass: `--cpu-iters`
back-to-back all-reduces of a zero buffer; cpu_s is their processor time
(all threads, all ranks) from time.process_time(). Rank 0 prints one JSON
line per size, {"size_bytes": ..., "times_s": [...], "cpu_s": ...,
"cpu_iters": ...}, after an {"info": ...} line.

    python3 tools/bench_allreduce_gloo.py --world-size 2 --sizes-bytes 1048576 --iters 20 --warmup 3
"""
import argparse
import json
import os
import socket
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, args, port):
    import torch
    import torch.distributed as dist

    # One intra-op thread: the all-reduce runs on gloo's own threads, and idle
    # OpenMP workers left spinning by the buffer refill (a parallel copy_)
    # would only take the cores from them. The Rust side refills with one
    # thread too.
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size
    )
    if rank == 0:
        info = {
            "torch": torch.__version__,
            "backend": dist.get_backend(),
            "torch_threads": torch.get_num_threads(),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME"),
        }
        print(json.dumps({"info": info}), flush=True)
    for size, cpu_iters in zip(args.sizes_bytes, args.cpu_iters):
        n = size // 4
        idx = torch.arange(n, dtype=torch.int64)
        template = (idx % 1000).to(torch.float32) * 0.001 + float(rank)
        buf = template.clone()
        for _ in range(args.warmup):
            buf.copy_(template)
            dist.all_reduce(buf)
        times = []
        for _ in range(args.iters):
            buf.copy_(template)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        expect = sum((idx % 1000).to(torch.float32) * 0.001 + float(r) for r in range(args.world_size))
        if not torch.allclose(buf, expect, rtol=1e-5, atol=1e-5):
            raise SystemExit(f"rank {rank}: wrong sums at size {size}")
        # CPU pass: zeros stay zeros, so no refill is needed between calls.
        zeros = torch.zeros(n, dtype=torch.float32)
        dist.barrier()
        c0 = time.process_time()
        for _ in range(cpu_iters):
            dist.all_reduce(zeros)
        cpu = time.process_time() - c0
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        cpu_all = torch.tensor([cpu], dtype=torch.float64)
        dist.all_reduce(cpu_all)
        if rank == 0:
            out = {"size_bytes": size, "times_s": slowest.tolist(), "cpu_s": cpu_all.item(), "cpu_iters": cpu_iters}
            print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--sizes-bytes", default=",".join(str(m << 20) for m in (1, 16, 128)))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--cpu-iters", default="", help="per size; default: --iters")
    args = p.parse_args()
    args.sizes_bytes = [int(s) for s in args.sizes_bytes.split(",")]
    args.cpu_iters = [int(s) for s in args.cpu_iters.split(",")] if args.cpu_iters else [args.iters] * len(args.sizes_bytes)
    if len(args.cpu_iters) != len(args.sizes_bytes):
        p.error("--cpu-iters needs one count per size")
    # gloo picks its interface from the hostname unless told; stay on loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(args, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
