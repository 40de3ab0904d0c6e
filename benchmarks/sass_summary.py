"""Summarises a Mosaic GPU dump folder: ptxas resource lines and warnings, and per-loop SASS
instruction counts by kind — small enough to bring back from a device run.

``benchmarks/mosaic_check.py --dump DIR`` has Mosaic GPU write each kernel's PTX, ptxas report
and SASS under DIR, then writes ``DIR/summary.txt`` with this module. The SASS needs
``nvdisasm`` on PATH (not in the device image; the ``nvidia-cuda-nvdisasm`` wheel has it under
``nvidia/cu13/bin``: see KERNEL_NOTES.md). By hand:

    python3 benchmarks/sass_summary.py DIR [> summary.txt]

A loop is a backward branch (``BRA`` to a label defined above it); its body is every
instruction from that label to the branch. Per loop: instructions in the body and a count per
kind (``KINDS``), which is what a step of the recurrence costs in issue slots.
"""

import collections
import os
import re
import sys

# Opcode (before the first '.') -> kind. Anything else counts as "other".
KINDS = {
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK", "FSET"),
    "convert": ("F2F", "F2FP", "F2I", "I2F", "I2FP", "PRMT"),
    "mufu": ("MUFU",),
    "tensor": ("HGMMA", "WGMMA", "HMMA"),
    "tensor_sync": ("WARPGROUP", "WARPSYNC", "DEPBAR", "WARPGROUPSET"),
    "barrier": ("BAR", "BARRIER", "SYNCS", "MEMBAR", "ERRBAR"),
    "shuffle": ("SHFL", "VOTE", "REDUX"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "global": ("LDG", "STG", "UTMALDG", "UTMASTG", "UTMAREDG", "UTMACMDFLUSH", "RED", "ATOMG",
               "UBLKCP", "UTMAPF"),
    "integer": ("IMAD", "IADD3", "IADD", "LEA", "SHF", "LOP3", "ISETP", "IABS", "IMNMX", "SEL",
                "SGXT", "BMSK", "FLO", "POPC", "UIADD3", "UIMAD", "ULEA", "USHF", "ULOP3",
                "UISETP", "USEL", "UMOV", "USGXT", "UPRMT", "R2UR", "S2UR", "S2R", "CS2R"),
    "move": ("MOV", "MOV32I"),  # and IMAD.MOV (kind_of)
    "control": ("BRA", "BSSY", "BSYNC", "EXIT", "NOP", "YIELD", "CALL", "RET", "PLOP3", "ELECT",
                "ENDCOLLECTIVE", "ACQBULK"),
}
_KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^\s]*)?")
_LABEL = re.compile(r"^\s*(\.L_[A-Za-z0-9_]+):")
_BRANCH_TARGET = re.compile(r"BRA[^;]*?(\.L_[A-Za-z0-9_]+|\b0x[0-9a-f]+)")
_PTXAS = re.compile(r"ptxas (info|warning)\s*:\s*(.*)")


def kind_of(opcode, suffix=""):
    if opcode == "IMAD" and suffix.startswith(".MOV"):  # ptxas's favourite register move
        return "move"
    return _KIND_OF.get(opcode, "other")


def parse_sass(text):
    """``(instructions, labels)``: instructions as ``(opcode, suffix, line)`` in order, labels
    as name (``.L_x_3``, or an address ``0x80`` for listings without labels) -> index of the
    instruction there."""
    instructions, labels = [], {}
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = _INSTRUCTION.search(line)
        if match:
            labels[f"0x{int(match.group(1), 16):x}"] = len(instructions)
            instructions.append((match.group(2), match.group(3) or "", line))
    return instructions, labels


def loops(instructions, labels):
    """Backward branches as ``(start, end)`` instruction index ranges (end inclusive)."""
    found = []
    for index, (opcode, _, line) in enumerate(instructions):
        if opcode != "BRA":
            continue
        target = _BRANCH_TARGET.search(line)
        name = target.group(1) if target else None
        if name and name.startswith("0x"):
            name = f"0x{int(name, 16):x}"
        if name in labels and labels[name] <= index:
            found.append((labels[name], index))
    return found


def loop_report(instructions, start, end):
    counts = collections.Counter(kind_of(op, suffix) for op, suffix, _ in
                                 instructions[start:end + 1])
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    return f"loop [{start}, {end}]: {end - start + 1} instructions: {kinds}"


def summarize_sass(text):
    instructions, labels = parse_sass(text)
    lines = [f"{len(instructions)} instructions"]
    # Innermost loops first (shortest bodies), where a recurrence step lives.
    for start, end in sorted(loops(instructions, labels), key=lambda r: r[1] - r[0]):
        lines.append(loop_report(instructions, start, end))
    return lines


def summarize_ptxas(text):
    """The resource lines (registers, spills, shared memory) and every warning."""
    return [f"{kind}: {message.strip()}" for kind, message in _PTXAS.findall(text)
            if kind == "warning" or re.search(r"registers|spill|smem|bytes stack", message)]


def summarize(folder):
    out = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name == "summary.txt" or os.path.getsize(path) > 200 * 2**20:
                continue
            with open(path, errors="replace") as fh:
                text = fh.read()
            parts = summarize_ptxas(text)
            if _INSTRUCTION.search(text) and ("HGMMA" in text or "FFMA" in text
                                              or "EXIT" in text):
                parts += summarize_sass(text)
            if parts:
                out.append(f"== {os.path.relpath(path, folder)}")
                out += ["  " + p for p in parts]
    return "\n".join(out) + "\n" if out else "no ptxas report or SASS found\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.stdout.write(summarize(sys.argv[1]))
