"""Meta-iterations/s of MAML training in 1 and 2 processes (torch.distributed, gloo on CPU), and what they send.

    python scripts/bench_distributed.py --out docs/results/bench_distributed.json \\
        --markdown docs/results/bench_distributed.md [--quick] [--iterations 3] [--method trpo]

The default `metarl train --agent maml-mlp` PointNav config (meta-batch 20, 20 trajectories per task, horizon 100),
one torch thread per process. Each process count runs in fresh processes started with torch.multiprocessing, with
the same code path as `torchrun -m metarl train` (the learner shards the meta-batch and all-reduces). Reported per
iteration: wall time, and from the all-reduce counter in `metarl.distributed`: calls, payload bytes, seconds spent
in all-reduce. The payload does not depend on the process count (gradients and Fisher-vector products are the
size of the parameters), so together with the call count it gives the communication cost on other networks.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from metarl.machine import benchmark_parser, machine_info, write_results

QUICK = {"env_options": "horizon=10", "batch.meta_batch": 4, "batch.trajectories_per_task": 2, "mlp.hidden": (16, 16)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: dict, iterations: int, out: str) -> None:
    """One rank: a warm-up iteration, then `iterations` timed ones; rank 0 saves the figures to `out`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from metarl import distributed
    from metarl.config import build_config
    from metarl.train import TrainConfig, make_learner

    distributed.init_distributed("cpu")
    learner = make_learner(build_config(TrainConfig, None, {"agent": "maml-mlp", "env": "PointNav", **overrides}))
    learner.train_iteration(0)
    distributed.barrier()
    distributed.COMM.reset()
    start = time.perf_counter()
    for i in range(1, iterations + 1):
        learner.train_iteration(i)
    elapsed = time.perf_counter() - start
    comm = distributed.COMM.as_dict()
    if rank == 0:
        params = sum(p.numel() for p in learner.policy.parameters())
        torch.save({"seconds": elapsed, "comm": comm, "params": params}, out)
    distributed.shutdown()
    # the figures are saved: leave without interpreter teardown, where gloo's and the TCP store's background threads
    # occasionally abort a rank (std::terminate on a joinable thread) after a clean destroy_process_group
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(world: int, overrides: dict, iterations: int) -> dict:
    """Figures of one process count, per iteration."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.pt")
        mp.spawn(_worker, args=(world, _free_port(), overrides, iterations, out), nprocs=world, join=True)
        raw = torch.load(out)
    per_iter = {k: v / iterations for k, v in raw["comm"].items()}
    return {"processes": world, "iterations": iterations, "iterations_per_s": iterations / raw["seconds"],
            "seconds_per_iteration": raw["seconds"] / iterations, "allreduce_calls_per_iteration": per_iter["calls"],
            "allreduce_bytes_per_iteration": per_iter["bytes"], "allreduce_seconds_per_iteration": per_iter["seconds"],
            "policy_parameters": raw["params"]}


def network_estimate(row: dict, gbit_per_s: float, latency_s: float, world: int) -> float:
    """Seconds per iteration a ring all-reduce of this traffic would take between `world` machines."""
    traffic = 2 * (world - 1) / world * row["allreduce_bytes_per_iteration"]  # bytes each rank sends
    return row["allreduce_calls_per_iteration"] * 2 * (world - 1) * latency_s + traffic * 8 / (gbit_per_s * 1e9)


def table(result: dict) -> str:
    rows = result["runs"]
    load = ", ".join(f"{x:.1f}" for x in result["machine"]["load_average_1_5_15_min"])
    shared = result["machine"]["load_average_1_5_15_min"][0] > result["machine"]["cpu_count"] + 0.5
    busy = " (other jobs shared the cores)" if shared else ""
    lines = [f"Distributed MAML-MLP training ({result['method']} outer step, {result['config']}), "
             f"{result['machine']['cpu']}, {result['machine']['cpu_count']} cores, 1 torch thread per process; "
             f"load average after the runs {load}{busy}. Time in all-reduce includes waiting "
             "for the slower rank.", "",
             "| processes | meta-iterations/s | s / iteration | speed-up | all-reduce calls / it | "
             "all-reduce payload / it | time in all-reduce / it |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['processes']} | {row['iterations_per_s']:.3f} | {row['seconds_per_iteration']:.2f} | "
                     f"{row['iterations_per_s'] / rows[0]['iterations_per_s']:.2f}x | "
                     f"{row['allreduce_calls_per_iteration']:.0f} | {row['allreduce_bytes_per_iteration'] / 1e3:.1f} kB | "
                     f"{row['allreduce_seconds_per_iteration'] * 1e3:.1f} ms |")
    lines += ["", "Estimated all-reduce time per iteration between machines (ring all-reduce of the same payload):", "",
              "| machines | 1 Gbit/s, 100 us | 10 Gbit/s, 20 us | 100 Gbit/s, 5 us |", "|---|---|---|---|"]
    for world, est in result["network_estimates"].items():
        lines.append(f"| {world} | " + " | ".join(f"{v * 1e3:.1f} ms" for v in est.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__, "tiny config and one timed iteration (a smoke test)")
    parser.add_argument("--iterations", type=int, default=3, help="timed meta-iterations per process count")
    parser.add_argument("--method", default="trpo", choices=("trpo", "ppo"), help="outer step")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    args = parser.parse_args()
    overrides = {**(QUICK if args.quick else {}), "outer.method": args.method}
    iterations = 1 if args.quick else args.iterations
    runs = [run(int(p), overrides, iterations) for p in args.processes.split(",")]
    ref = next((r for r in runs if r["processes"] > 1), runs[-1])
    links = {"1gbit_100us": (1.0, 100e-6), "10gbit_20us": (10.0, 20e-6), "100gbit_5us": (100.0, 5e-6)}
    estimates = {str(w): {k: network_estimate(ref, g, lat, w) for k, (g, lat) in links.items()} for w in (2, 8, 32)}
    config = "quick: horizon 10, meta-batch 4, 2 trajectories" if args.quick else \
        "default: PointNav horizon 100, meta-batch 20, 20 trajectories per task, MLP 100x100"
    result = {"machine": {**machine_info(), "load_average_1_5_15_min": list(os.getloadavg())}, "method": args.method,
              "config": config, "runs": runs, "network_estimates": estimates}
    write_results(result, args.out, table(result), args.markdown)


if __name__ == "__main__":
    main()
