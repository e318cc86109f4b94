"""Where SeLoRA's extra step time goes, on one GPU: (1) GPU time of each spectral decode / fit of a LLaMA-7B
layer's factor shapes, timed with CUDA events and as CUDA-graph replays (no launch gaps); (2) torch.profiler
over training steps of a 2-layer LLaMA-7B-shaped model, selora LoRA vs SeLoRA (cached decode), top ops by
device time and the host time per step (SeLoRA decoding the whole model at once, and factor by factor).

    python bench/profile_selora.py --out docs/benchmarks      # writes profile_selora.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selora  # noqa: E402
from selora.decode import IndexSet  # noqa: E402

BASIS = "dct_rows"  # the row-wise DCT this profile was first written for; bench/bases_speed.py covers all bases

FACTOR_LENGTHS = {4096: 11, 11008: 3}  # per LLaMA-7B layer: 11 factors of length 4096, 3 of 11008


def event_time_ms(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn, repeats: int = 200) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return event_time_ms(graph.replay, repeats)


def decode_table(rank: int) -> list[str]:
    rows = ["| op | length | K | rows | event time (us) | graph replay (us) |", "|---|---|---|---|---|---|"]
    generator = torch.Generator().manual_seed(0)
    per_layer = {"event": 0.0, "graph": 0.0}
    for length, count_per_layer in FACTOR_LENGTHS.items():
        k = length // 2
        basis = selora.bases.get(BASIS)
        locations = IndexSet.draw(BASIS, rank, length, k * rank, seed=0).on(torch.device("cuda"))
        coefficients = torch.randn(rank * k, device="cuda")
        grad = torch.randn(rank, length, device="cuda", dtype=torch.bfloat16)
        ops = {"decode (fp32 rows)": lambda: basis.decode(coefficients, locations, rank, length),
               "decode + cast to bf16": lambda: basis.decode(coefficients, locations, rank, length).to(torch.bfloat16),
               "fit (bf16 gradient)": lambda: basis.adjoint(grad, locations)}
        for name, fn in ops.items():
            event, graph = event_time_ms(fn) * 1000, graph_time_ms(fn) * 1000
            rows.append(f"| {name} | {length} | {k} | {rank} | {event:.1f} | {graph:.1f} |")
            if name != "decode (fp32 rows)":
                per_layer["event"] += event * count_per_layer
                per_layer["graph"] += graph * count_per_layer
    rows.append(f"| one layer's 14 decodes + 14 fits | | | | {per_layer['event']:.0f} | {per_layer['graph']:.0f} |")
    total = 0.0
    for length, count_per_layer in FACTOR_LENGTHS.items():  # the batched path: all 32 layers' factors at once
        k, stacked = length // 2, 32 * count_per_layer
        basis = selora.bases.get(BASIS)
        locations = IndexSet.draw(BASIS, rank, length, k * rank, seed=0).on(torch.device("cuda"))
        coefficients = torch.randn(stacked, rank * k, device="cuda")
        grad = torch.randn(stacked, rank, length, device="cuda", dtype=torch.bfloat16)
        for name, fn in (("batched decode, 32 layers", lambda: basis.decode(coefficients, locations, rank, length)),
                         ("batched fit, 32 layers", lambda: basis.adjoint(grad, locations))):
            event = event_time_ms(fn, 50) * 1000
            total += event
            rows.append(f"| {name} | {length} | {k} | {stacked} | {event:.1f} | |")
    rows.append(f"| a 32-layer model's decode + fit, batched | | | | {total:.0f} | |")
    return rows


def profile_steps(method: str, rank: int, batch: int, seq: int, quant: str = "bf16") -> tuple[list[str], float, float]:
    from torch.profiler import ProfilerActivity, profile
    sys.argv = sys.argv[:1]
    from bench.step_time import Trainee
    trainee = Trainee(quant, method, 2, rank, batch, seq, 100)
    trainee.run(3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        times = trainee.run(5)  # steps 4-8: SRLoRA recomposes once (every 5 steps)
    averages = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in averages) / 5 / 1000
    host_top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    top = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:14]
    rows = [f"| host: {e.key[:54]} | {e.count // 5} | {e.self_cpu_time_total / 5 / 1000:.2f} (host) |" for e in host_top]
    rows += [f"| {e.key[:60]} | {e.count // 5} | {e.self_device_time_total / 5 / 1000:.2f} |" for e in top]
    del trainee
    return rows, statistics.median(times) * 1000, device_total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    lines = [f"# Where SeLoRA's step time goes\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"r={args.rank}, spectral ratio 0.5 (DCT).\n\n## Decode and fit per factor shape\n"]
    lines += decode_table(args.rank)
    for method, quant in (("selora_lora", "bf16"), ("selora_selora", "bf16"), ("selora_selora_per_factor", "bf16"),
                          ("selora_lora", "4bit"), ("selora_srlora", "4bit")):
        rows, wall, device = profile_steps(method, args.rank, args.batch, args.seq, quant)
        lines += [f"\n## {method}, {quant} base: 2 LLaMA-7B layers, batch {args.batch} x {args.seq}, per step: wall {wall:.1f} ms, "
                  f"summed device time {device:.1f} ms\n", "| op | calls / step | device ms / step |", "|---|---|---|"]
        lines += rows
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_selora.md").write_text(text)


if __name__ == "__main__" and "--srlora-breakdown" not in sys.argv:
    main()


def srlora_breakdown(quant: str, rank: int, batch: int, seq: int, steps: int = 10) -> list[str]:
    """Synchronized time of each part of an SRLoRA step (2 layers, recomposing every 5 steps) vs selora LoRA."""
    import time
    from bench.step_time import Trainee
    rows = []
    for method in ("selora_lora", "selora_srlora"):
        trainee = Trainee(quant, method, 2, rank, batch, seq, 100)
        trainee.run(3)
        parts = {"forward + backward": [], "optimizer": [], "srlora.step: scores": [], "srlora.step: recomposition": []}
        for _ in range(steps):
            trainee.step_count += 1
            ids = trainee.inputs[trainee.step_count % len(trainee.inputs)]
            marks = [time.perf_counter()]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = trainee.model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            trainee.optimizer.step()
            trainee.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if trainee.srlora is not None:
                recomposes = trainee.step_count in trainee.srlora.schedule
                trainee.srlora.step(trainee.step_count, trainee.optimizer)
                torch.cuda.synchronize()
                marks.append(time.perf_counter())
                parts["srlora.step: recomposition" if recomposes else "srlora.step: scores"].append(marks[3] - marks[2])
            parts["forward + backward"].append(marks[1] - marks[0])
            parts["optimizer"].append(marks[2] - marks[1])
        for part, values in parts.items():
            if values:
                rows.append(f"| {quant} | {method} | {part} | {len(values)} | {statistics.median(values) * 1000:.1f} |")
        del trainee
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__" and "--srlora-breakdown" in sys.argv:
    table = ["| base | method | part | steps | median ms |", "|---|---|---|---|---|"]
    for quant in ("bf16", "4bit"):
        table += srlora_breakdown(quant, 16, 4, 1024)
    print("\n".join(table))
