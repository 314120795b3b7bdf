"""Where a training step's kernel time comes from in our source: CUPTI kernels -> HLO -> lines.

``benchmarks/profile_step.py`` records every kernel of one step by name
(``loop_convert_fusion_11``, ``bigla_backward_dkv``, ...). XLA's optimized HLO names the same
fusions (``loop_convert_fusion.11``) and gives each instruction a ``stack_frame_id`` into the
module's ``StackFrames`` table, which leads to file, line and function. This joins the two: each
kernel is charged to the innermost frame in this repository that most of its fused instructions
come from, and the times are summed per frame (Pallas kernels and library calls without frames
keep their own names).

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*train_step.*" \\
        python3 -m benchmarks.profile_step --models vig_t --top 600 --out /tmp/profile.json
    python3 -m benchmarks.attribute_profile /tmp/hlo/*jit_train_step*after_optimizations.txt \\
        /tmp/profile.json --model vig_t [--detail vig_jax/bigla.py:188]

Approximate by construction: one fusion may hold the work of several source lines; the line
that contributes most of its instructions gets all of its time.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

_ENTRY = re.compile(r"^(\d+) (.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")


def _tables(text: str) -> dict[str, dict[int, str]]:
    """The module's FileNames, FunctionNames, FileLocations and StackFrames tables by id."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (m := _ENTRY.match(line)):
            current[int(m.group(1))] = m.group(2)
        elif current is not None and line.strip():
            current = None
    return tables


class SourceMap:
    """Stack frames of one optimized HLO module, resolved to ``file:line function``."""

    def __init__(self, text: str, root: str):
        t = _tables(text)
        self.files = {i: v.strip('"') for i, v in t.get("FileNames", {}).items()}
        self.functions = {i: v.strip('"') for i, v in t.get("FunctionNames", {}).items()}
        self.locations = {
            i: {k: int(x) for k, x in _FIELDS.findall(v)}
            for i, v in t.get("FileLocations", {}).items()
        }
        self.frames = {
            i: {k: int(x) for k, x in _FIELDS.findall(v)}
            for i, v in t.get("StackFrames", {}).items()
        }
        self.root = root.rstrip("/") + "/"
        self.instructions: dict[str, str] = {}
        self.computations: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            if m := _COMPUTATION.match(line):
                current = self.computations.setdefault(m.group(1), [])
            elif m := _INSTRUCTION.match(line):
                self.instructions[m.group(1)] = line
                if current is not None:
                    current.append(line)

    def frame(self, frame_id: int, skip: tuple[str, ...]) -> str | None:
        """The innermost frame of ``frame_id``'s stack inside ``root`` and outside ``skip``."""
        seen = set()
        while frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            frame = self.frames[frame_id]
            loc = self.locations.get(frame.get("file_location_id", -1), {})
            path = self.files.get(loc.get("file_name_id", -1), "")
            if path.startswith(self.root):
                rel = path[len(self.root) :]
                if not rel.startswith(skip):
                    func = self.functions.get(loc.get("function_name_id", -1), "?")
                    return f"{rel}:{loc.get('line', 0)} {func}"
            frame_id = frame.get("parent_frame_id", 0)
        return None

    def instruction(self, kernel: str) -> str:
        """The HLO line of a CUPTI kernel name (``name_11`` is ``name.11`` in the dump)."""
        return self.instructions.get(kernel) or self.instructions.get(
            re.sub(r"_(\d+)$", r".\1", kernel), ""
        )

    def source_of(self, kernel: str, skip: tuple[str, ...]) -> str:
        """The frame most of the kernel's (fused) instructions come from, or the kernel's name."""
        line = self.instruction(kernel)
        lines = [line]
        for called in re.findall(r"calls=%([\w.\-]+)", line):
            lines += self.computations.get(called, [])
        votes = collections.Counter()
        for text in lines:
            for frame_id in re.findall(r"stack_frame_id=(\d+)", text):
                if where := self.frame(int(frame_id), skip):
                    votes[where] += 1
        return votes.most_common(1)[0][0] if votes else f"({kernel})"


def attribute(source: SourceMap, kernels, skip=("benchmarks/", "train/")) -> list[dict]:
    """[{'source', 'ms', 'kernels': [(name, ms), ...]}] sorted by time, from (name, ms) pairs."""
    groups: dict[str, list] = collections.defaultdict(list)
    for name, ms in kernels:
        groups[source.source_of(name, skip)].append((name, ms))
    rows = [
        {"source": k, "ms": sum(ms for _, ms in v), "kernels": sorted(v, key=lambda x: -x[1])}
        for k, v in groups.items()
    ]
    return sorted(rows, key=lambda r: -r["ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hlo", help="XLA's *after_optimizations.txt dump of the step")
    parser.add_argument("profile", help="profile_step JSON (run with a large --top)")
    parser.add_argument("--model", default=None, help="the row's model (default: the first)")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--detail", default=None, help="list the kernels of sources with this")
    args = parser.parse_args()
    rows = json.loads(Path(args.profile).read_text())["rows"]
    row = next((r for r in rows if args.model in (None, r["model"])), None)
    if row is None:
        raise SystemExit(f"no row for model {args.model!r} in {args.profile}")
    source = SourceMap(Path(args.hlo).read_text(), args.root)
    listed = sum(ms for _, ms in row["top"])
    print(f"{row['model']}: {listed:.2f} of {row['kernel_ms']:.2f} ms of kernels listed")
    for r in attribute(source, row["top"])[: args.rows]:
        print(f"{r['ms']:7.3f} ms {len(r['kernels']):4d} kernels  {r['source']}")
        if args.detail and args.detail in r["source"]:
            for name, ms in r["kernels"]:
                print(f"          {ms:7.3f}  {name}")


if __name__ == "__main__":
    main()
