"""A description of the machine a benchmark ran on, for its JSON output."""

from __future__ import annotations

import os
import platform

import torch


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def benchmark_parser(doc: str | None, quick_help: str):
    """The options every benchmark script shares: --out JSON, --quick, --markdown."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--markdown", help="also write a markdown table to this file")
    return parser


def write_results(result: dict, out: str, table: str, markdown_path: str | None) -> None:
    """Writes the JSON result (and the markdown table, if asked), then prints the table."""
    import json
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    if markdown_path:
        Path(markdown_path).write_text(table)
    print(table)
