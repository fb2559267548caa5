"""summary.md for benchmarks/gpu_check.py: its JSON as markdown tables, ready for benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _stages(payload: dict) -> dict[str, dict]:
    return {s["name"]: s for s in payload["stages"]}


def _data(stages: dict[str, dict], name: str) -> dict | None:
    stage = stages.get(name)
    return stage.get("data") if stage else None


def _environment(payload: dict, stages: dict[str, dict]) -> list[str]:
    env = _data(stages, "env") or {}
    matmul = _data(stages, "matmul")
    device = env.get("gpu", "unknown")
    title = f"## {device}, {env.get('date', 'date unknown')} (`{payload['command']}`)"
    rows = [
        ["GPU", f"{device}" + (f", {env['gpu_memory_gib']:.0f} GiB, {env['multiprocessors']} SMs, sm_"
                               f"{env['capability'].replace('.', '')}" if "gpu_memory_gib" in env else "")],
        ["driver / CUDA", f"{env.get('driver', '-')} / {env.get('cuda', '-')}"],
        ["torch / triton / flash-attn", f"{env.get('torch', '-')} / {env.get('triton', '-')} / "
                                        f"{env.get('flash_attn', '-')}"],
        ["Python / hydra-core", f"{env.get('python', '-')} / {env.get('hydra_core', '-')}"],
        ["commit", env.get("commit", "-")],
        ["command", f"`{payload['command']}` ({payload['mode']} mode, {payload['total_seconds']:.0f} s of a "
                    f"{payload['budget_seconds']:.0f} s budget)"],
    ]
    if matmul:
        peak = matmul.get("datasheet_peak_tflops")
        rows.append([f"{matmul['dtype']} matmul ceiling", f"{matmul['tflops']:.1f} TFLOP/s ({matmul['n']}^3, best of "
                     f"20)" + (f"; datasheet peak {peak:.0f} TFLOP/s" if peak else "")])
    return [title, "", *_table(["", ""], rows)]


def _stage_table(payload: dict) -> list[str]:
    rows = [[s["name"], s["status"], f"{s['seconds']:.0f}", _fmt(s["timeout_s"] or None, ".0f"), s["reason"]]
            for s in payload["stages"]]
    return ["", "### Stages", "", *_table(["stage", "status", "seconds", "limit", "note"], rows)]


def _attention_check(stages: dict[str, dict]) -> list[str]:
    data = _data(stages, "attention_check")
    if not data:
        return []
    rows = [[r["impl"], r["case"], r["status"], *(_fmt(r["errors"].get(k), ".1e") for k in ("out", "dq", "dk", "dv")),
             _fmt(r.get("seconds"), ".1f"), r["note"]] for r in data["rows"]]
    return ["", f"### Attention correctness ({data['dtype']} against the fp32 reference; relative error, tolerance "
            f"{data['tolerance']:g})", "", *_table(
        ["impl", "case", "status", "out", "dq", "dk", "dv", "s (compile included)", "note"], rows)]


def _attention_timings(stages: dict[str, dict]) -> tuple[list[str], dict[tuple[str, int], float]]:
    results = [r for name in ("attention_triton", "attention_flex", "attention_sdpa", "attention_flash")
               for r in ((_data(stages, name) or {}).get("results") or [])]
    if not results:
        return [], {}
    fwd_bwd = {(r["impl"], r["seq"]): r["fwd_bwd_ms"] for r in results if r.get("fwd_bwd_ms")}
    rows = []
    for r in results:
        triton = fwd_bwd.get(("triton", r["seq"]))
        mine = r.get("fwd_bwd_ms")
        speedup = f"{mine / triton:.2f}x" if triton and mine and r["impl"] != "triton" else "-"
        rows.append([r["impl"], str(r["batch"]), str(r["seq"]), str(r["n_heads"]), str(r["head_dim"]), r["check"],
                     _fmt(r.get("fwd_ms"), ".3f"), _fmt(r.get("bwd_ms"), ".3f"), _fmt(mine, ".3f"),
                     _fmt(r.get("fwd_bwd_tflops"), ".1f"), _fmt(r.get("peak_mem_gib"), ".2f"), speedup,
                     "; ".join(r.get("notes") or [])])
    header = ["impl", "B", "seq", "H", "D", "check", "fwd ms", "bwd ms", "f+b ms", "f+b TFLOP/s", "peak GiB",
              "triton faster by", "notes"]
    return ["", "### Attention, causal ALiBi, forward+backward (benchmarks/attention.py; causal FLOPs)", "",
            *_table(header, rows)], fwd_bwd


def _throughput(stages: dict[str, dict]) -> list[str]:
    rows = []
    for name in ("throughput_mpt1b", "throughput_7b_slice"):
        r = _data(stages, name)
        if not r:
            continue
        cfg = r["config"]
        rows.append([f"{r['preset']} ({cfg['n_layers']} layers, d_model {cfg['d_model']})", cfg["attn_impl"],
                     f"{r['micro_batch']} x {r['seq']}", r["parallel"], f"{r['step_seconds_median'] * 1e3:.1f}",
                     f"{r['tokens_per_sec']:,.0f}", f"{r['tflops']:.1f}",
                     _fmt(None if r["mfu_vs_peak"] is None else 100 * r["mfu_vs_peak"], ".1f"),
                     f"{100 * r['mfu_vs_matmul_ceiling']:.1f}", _fmt(r["peak_memory_gib"], ".1f")])
    if not rows:
        return []
    header = ["model", "attn", "batch x seq", "parallel", "step ms", "tokens/s", "TFLOP/s", "MFU % (datasheet)",
              "% of measured matmul", "peak GiB"]
    return ["", "### Training throughput, one device (benchmarks/throughput.py; 6N + 12 L d seq FLOPs per token)", "",
            *_table(header, rows)]


def _float8(stages: dict[str, dict]) -> list[str]:
    data = _data(stages, "float8")
    if not data:
        return []
    title = "### float8 training against bf16 (benchmarks/float8_check.py; torchao)"
    if "skipped" in data:
        return ["", title, "", f"- skipped: {data['skipped']}"]
    rows = [[r["variant"], f"{r['float8_layers']}", f"{r['step_seconds_median'] * 1e3:.1f}",
             f"{r['tokens_per_sec']:,.0f}", f"{r['tflops']:.1f}",
             _fmt(None if r["mfu_vs_bf16_peak"] is None else 100 * r["mfu_vs_bf16_peak"], ".1f"),
             _fmt(r.get("speedup_vs_bf16"), ".2f"), f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
             _fmt(r.get("max_rel_loss_diff_vs_bf16"), ".2%"), _fmt(r.get("peak_memory_gib"), ".1f")]
            for r in data["rows"]]
    header = ["variant", "float8 layers", "step ms", "tokens/s", "TFLOP/s", "MFU % (bf16 peak)", "x bf16",
              f"loss, {data['steps']} steps", "max loss diff vs bf16", "peak GiB"]
    what = (f"{data['preset']} ({data['n_layers']} layers), {data['micro_batch']} x {data['seq']}, compile="
            f"{data['compile']}, torch {data['torch']}, torchao {data['torchao']}, {data['device_name']}")
    return ["", title, "", what, "", *_table(header, rows), *(f"- {note}" for note in data["skipped_variants"])]


def _memory(stages: dict[str, dict]) -> list[str]:
    data = _data(stages, "memory")
    if not data:
        return []
    rows = [[r["config"], f"{r['estimated_gb']:.2f}", r["estimated_phase"], _fmt(r["measured_gb"], ".2f"),
             _fmt(r["ratio"], ".3f"), r["note"]] for r in data["rows"]]
    return ["", "### Memory estimate (mptlike.parallel.memory) against torch.cuda.max_memory_allocated", "",
            *_table(["config", "estimated GB", "peak phase", "measured GB", "estimate / measured", "note"], rows)]


def _tests(stages: dict[str, dict]) -> list[str]:
    lines = []
    for name, what in (("gpu_tests", "kernels, loss, eval, generation"), ("gpu_train_tests", "training runs")):
        data = _data(stages, name)
        if not data:
            continue
        lines += ["", f"GPU tests, {what} (`pytest -m gpu`): {data['passed']} passed, "
                  f"{data['failures'] + data['errors']} failed, {data['skipped']} skipped",
                  *(f"- failed: `{test}`" for test in data["failed_tests"])]
    return lines


def _targets(payload: dict, stages: dict[str, dict], fwd_bwd: dict[tuple[str, int], float]) -> list[str]:
    targets = payload["targets"]
    lines = ["", "### Targets (issue 12)", ""]
    if payload["mode"] != "gpu":
        return [*lines, "- CPU mode: the targets are GPU figures, not checked here"]

    def verdict(value: float | None, goal: float, text: str) -> str:
        if value is None:
            return f"- {text}: unmeasured"
        return f"- {text}: {value:.2f} ({'met' if value >= goal else 'NOT met'}, target >= {goal:g})"

    for name, key, text in (("throughput_mpt1b", "mfu_mpt1b", "mpt-1b MFU"),
                            ("throughput_7b_slice", "mfu_7b_slice", "7B-width slice MFU")):
        r = _data(stages, name)
        lines.append(verdict(r["mfu_vs_peak"] if r else None, targets[key], text))
    for other, key in (("flex", "triton_vs_flex"), ("sdpa", "triton_vs_sdpa")):
        for seq in sorted({s for impl, s in fwd_bwd if impl == "triton"}):
            mine, theirs = fwd_bwd.get(("triton", seq)), fwd_bwd.get((other, seq))
            ratio = theirs / mine if mine and theirs else None
            lines.append(verdict(ratio, targets[key], f"triton forward+backward speed-up over {other}, seq {seq}"))
    return lines


def write_summary(path: Path, payload: dict) -> None:
    stages = _stages(payload)
    timings, fwd_bwd = _attention_timings(stages)
    lines = [*_environment(payload, stages), *_stage_table(payload), *_attention_check(stages), *timings,
             *_throughput(stages), *_float8(stages), *_memory(stages), *_tests(stages),
             *_targets(payload, stages, fwd_bwd)]
    skipped = [s for s in payload["stages"] if s["status"] == "skipped"]
    if skipped:
        lines += ["", "Skipped:", *(f"- {s['name']}: {s['reason']}" for s in skipped)]
    path.write_text("\n".join(lines) + "\n")
