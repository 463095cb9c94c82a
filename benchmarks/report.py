"""Turn the benchmark JSON into the markdown table, the target checks and the long-context plot."""

from __future__ import annotations

from pathlib import Path

GB = 1e9
TARGET_SEQ_SHORT, TARGET_SEQ_MID, TARGET_SEQ_LONG = 2048, 8192, 32768


def _row(rows: list[dict], seq_length: int) -> dict | None:
    return next((row for row in rows if row["seq_length"] == seq_length), None)


def check_targets(rows: list[dict], mfu: float | None) -> list[tuple[str, bool | None, str]]:
    """Each issue target with its verdict (None: not measured) and the measured figure."""
    checks: list[tuple[str, bool | None, str]] = []
    short, mid, long = (_row(rows, seq) for seq in (TARGET_SEQ_SHORT, TARGET_SEQ_MID, TARGET_SEQ_LONG))
    if short and "speedup" in short:
        checks.append(
            ("seq 2048: >= 1.5x transformers tokens/s", short["speedup"] >= 1.5, f"{short['speedup']:.2f}x")
        )
    if mid and "speedup" in mid:
        checks.append(
            ("seq 8192: >= 3.5x transformers tokens/s", mid["speedup"] >= 3.5, f"{mid['speedup']:.2f}x")
        )
        checks.append(
            (
                "seq 8192: <= 0.4x transformers peak memory",
                mid["memory_ratio"] <= 0.4,
                f"{mid['memory_ratio']:.2f}x",
            )
        )
    if long:
        peak = long["ours"]["peak_rss_bytes"]
        checks.append(("seq 32768: peak RSS <= 8 GB", peak <= 8 * GB, f"{peak / GB:.2f} GB"))
        if short:
            relative = long["ours"]["tokens_per_s"] / short["ours"]["tokens_per_s"]
            checks.append(("seq 32768: >= 80% of our seq-2048 tokens/s", relative >= 0.8, f"{relative:.0%}"))
    checks.append(
        (
            "CPU MFU at seq 2048 >= 25% of the measured bf16 matmul peak",
            None if mfu is None else mfu >= 0.25,
            "n/a" if mfu is None else f"{mfu:.1%}",
        )
    )
    return checks


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], machine: dict, peak_tflops: float | None, mfu: float | None) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB RAM; torch "
        f"{machine['torch']}, Lightning {machine['lightning']}; load average at the end {machine['load_average']}.",
        "",
        "| seq | ours tokens/s | transformers tokens/s | speedup | ours peak RSS | transformers peak RSS "
        "| memory ratio | ours activation ckpt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = row["ours"], row.get("transformers")
        lines.append(
            "| "
            + " | ".join(
                [
                    str(row["seq_length"]),
                    _cell(ours["tokens_per_s"], ".0f"),
                    _cell(theirs and theirs["tokens_per_s"], ".0f"),
                    _cell(row.get("speedup"), ".2f") + ("x" if "speedup" in row else ""),
                    f"{ours['peak_rss_bytes'] / GB:.2f} GB",
                    "—" if not theirs else f"{theirs['peak_rss_bytes'] / GB:.2f} GB",
                    _cell(row.get("memory_ratio"), ".2f") + ("x" if "memory_ratio" in row else ""),
                    row["activation_checkpointing"],
                ]
            )
            + " |"
        )
    lines += ["", f"bf16 matmul peak measured in the run: {_cell(peak_tflops, '.3f')} TFLOP/s.", ""]
    lines += ["| target | met | measured |", "|---|---|---|"]
    for what, passed, figure in check_targets(rows, mfu):
        lines.append(f"| {what} | {'n/a' if passed is None else 'yes' if passed else 'NO'} | {figure} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path | None:
    """Tokens/s and peak RSS against sequence length, ours and transformers; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for impl, style in (("ours", "o-"), ("transformers", "s--")):
        points = [(row["seq_length"], row[impl]) for row in rows if row.get(impl)]
        if not points:
            continue
        seqs = [seq for seq, _ in points]
        speed.plot(seqs, [run["tokens_per_s"] for _, run in points], style, label=impl)
        memory.plot(seqs, [run["peak_rss_bytes"] / GB for _, run in points], style, label=impl)
    for axis, label in ((speed, "training tokens/s"), (memory, "peak RSS (GB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (window 512)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.suptitle("Mistral bench config (60M), bf16, AdamW, batch 1, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
