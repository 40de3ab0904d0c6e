"""Where a profiled program's time went: the busiest event names per device timeline of a
``jax.profiler`` trace.

``jax.profiler.trace(DIR, create_perfetto_trace=True)`` writes
``DIR/plugins/profile/<run>/perfetto_trace.json.gz`` (Chrome trace-event JSON). On a GPU its
device processes hold one timeline per stream (kernel executions) and derived ones (XLA ops,
modules); summing over all of them would count a kernel twice, so this prints each timeline of
the matching processes separately: its busy time and its ``--top`` event names by total time.

    python benchmarks/trace_summary.py DIR_OR_FILE [--process GPU] [--top 15] [--hlo DUMP_DIR]

With ``--hlo`` (the ``XLA_FLAGS=--xla_dump_to=DUMP_DIR`` of the same program) each busy XLA
kernel's instruction in the optimized HLO follows its timeline: its shapes and, for a fusion,
the first lines of the fused computation, to say what a name like ``input_transpose_fusion_5``
computes.

``benchmarks/train_bench.py --profile DIR`` records such a trace of the train step and prints
this summary of it.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re


def find_trace(path):
    """The newest perfetto trace under ``path`` (or ``path`` itself when it is a file)."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"no perfetto_trace.json.gz under {path}")
    return max(found, key=os.path.getmtime)


def read_events(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events, process_filter="", top=15):
    """``[(process, thread, busy_us, count, [(name, total_us, calls), ...])]`` for the threads
    of processes whose name contains ``process_filter`` (case-insensitive), busiest first; only
    complete events (``ph == "X"``) count."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", str(e["pid"]))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", str(e.get("tid")))
    per_thread = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.get("ph") != "X":
            continue
        process = processes.get(e.get("pid"), str(e.get("pid")))
        if process_filter.lower() not in process.lower():
            continue
        entry = per_thread[(process, threads.get((e["pid"], e.get("tid")), str(e.get("tid"))))]
        entry[e.get("name", "?")][0] += float(e.get("dur", 0.0))
        entry[e.get("name", "?")][1] += 1
    rows = []
    for (process, thread), names in per_thread.items():
        ranked = sorted(((n, t, c) for n, (t, c) in names.items()), key=lambda r: -r[1])
        rows.append((process, thread, sum(t for _, t, _ in ranked),
                     sum(c for _, _, c in ranked), ranked[:top]))
    return sorted(rows, key=lambda r: -r[2])


def print_summary(rows, threads=6):
    """Prints the first ``threads`` rows of ``summarize``: busy time, then the top names."""
    for process, thread, busy, count, ranked in rows[:threads]:
        print(f"\n{process} / {thread}: {busy / 1e3:.3f} ms busy in {count} events")
        for name, total, calls in ranked:
            print(f"  {total / 1e3:9.3f} ms {100 * total / busy:5.1f} % {calls:6d}x  {name[:90]}")


def hlo_definitions(dump_dir, names, body_lines=30):
    """``{name: text}``: the instruction ``name`` in the optimized HLO modules under
    ``dump_dir`` (``*after_optimizations.txt``) and, for a fusion, the head of the computation
    it calls."""
    found = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")),
                       key=os.path.getsize, reverse=True):
        with open(path) as fh:
            lines = fh.read().splitlines()
        starts = {}  # computation name -> line index of its header
        for i, line in enumerate(lines):
            header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
            if header and line.rstrip().endswith("{"):
                starts[header.group(1)] = i
        for name in names:
            if name in found:
                continue
            # The profiler writes "fusion_5" for the HLO's "fusion.5".
            spelled = re.escape(name)
            suffix = re.match(r"^(.*)_(\d+)$", name)
            if suffix:
                spelled = f"(?:{spelled}|{re.escape(suffix.group(1))}\\.{suffix.group(2)})"
            pattern = re.compile(rf"^\s*(?:ROOT )?%?{spelled} = ")
            for line in lines:
                if pattern.match(line):
                    text = [line.strip()[:600]]
                    called = re.search(r"calls=%?([\w.\-]+)", line)
                    if called and called.group(1) in starts:
                        first = starts[called.group(1)]
                        for body in lines[first:first + body_lines + 1]:
                            text.append("    " + body.strip()[:300])
                            if body.strip() == "}":
                                break
                    found[name] = "\n".join(text)
                    break
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a trace file, or the directory given to jax.profiler.trace")
    p.add_argument("--process", default="GPU",
                   help="only processes whose name contains this (default GPU; '' = all)")
    p.add_argument("--top", type=int, default=15, help="event names shown per timeline")
    p.add_argument("--threads", type=int, default=6, help="timelines shown (busiest first)")
    p.add_argument("--hlo", metavar="DUMP_DIR",
                   help="XLA dump of the same program: print each busy kernel's HLO")
    args = p.parse_args(argv)
    path = find_trace(args.path)
    rows = summarize(read_events(path), args.process, args.top)
    if not rows:
        raise SystemExit(f"no complete events in processes matching {args.process!r} in {path}")
    print(f"trace {path}")
    print_summary(rows, args.threads)
    if args.hlo:
        names = [name for _, _, _, _, ranked in rows[:args.threads] for name, _, _ in ranked]
        definitions = hlo_definitions(args.hlo, names)
        print(f"\nHLO of the busy kernels ({len(definitions)} of {len(set(names))} found "
              f"under {args.hlo}):")
        for name, text in definitions.items():
            print(f"\n{name}:\n{text}")


if __name__ == "__main__":
    main()
