"""Shared by the benchmark scripts: the machine line and rewriting one section of docs/benchmarks.md."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from typing import Optional


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[str]:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return None


def machine(gpu: Optional[str] = None) -> str:
    """One line: the accelerator (if any), CPU, cores, memory, library versions."""
    import torch

    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) / 2**20
        mem_s = f", {mem:.0f} GiB RAM"
    except (OSError, AttributeError):
        mem_s = ""
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("deepspeed", "transformers", "accelerate"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")  # without importing it
        except importlib.metadata.PackageNotFoundError:
            pass
    head = f"{gpu}; " if gpu else ""
    return f"{head}{cpu_name()}, {os.cpu_count()} cores{mem_s}; {', '.join(versions)}"


def write_section(doc: str, title: str, body: str) -> None:
    """Replace the section ``title`` (a ``## `` heading line) of ``doc`` with ``body``, or append it.

    Other sections are left exactly as they are (other benchmark scripts own them).
    """
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else "# Benchmarks\n\n"
    if not body.startswith(title + "\n"):
        raise ValueError(f"the section must start with its heading {title!r}")
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + body.rstrip("\n") + "\n" + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    tmp = doc + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(tmp, doc)
