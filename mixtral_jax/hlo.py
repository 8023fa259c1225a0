"""Reading a compiled program's optimized HLO text (`compiled.as_text()`) for the planner.

`collectives`: every collective, with its bytes per device and how often it
runs per call. XLA's cost analysis counts a loop body once, so a collective
inside the layer scan appears once per program but runs once per layer. Here
every computation gets a multiplicity (how many times one call of the program
runs it): a while loop's body runs its trip count times (XLA's
`known_trip_count` annotation, or the constant its condition compares the
counter against), everything else as often as its caller.
`loops`: the while loops and their trip counts. `entry_copy_bytes`: the
bytes of the program's top-level layout copies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_CONSTANT = re.compile(r"constant\((-?\d+)\)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program."""

    op: str             # e.g. "all-gather" ("-start" of an async pair folded in)
    shape: str          # its result, as written in the HLO
    bytes: int          # bytes per device per run: the larger of its operands and its result (for a
                        # ragged-all-to-all: of its input and its output buffer, a static worst case)
    group_size: int | None  # devices per group, when the HLO says
    count: int          # runs per program call (the trip counts of the loops around it)
    op_name: str        # the jax source op it came from (metadata op_name)

    @property
    def bytes_per_call(self) -> int:
        return self.bytes * self.count


def _dtype_bytes(dtype: str) -> float:
    if dtype == "pred":
        return 1
    if dtype == "token":
        return 0
    bits = re.search(r"\d+", dtype)
    return int(bits.group()) / 8 if bits else 0


def _array_bytes(text: str) -> list[int]:
    """Bytes of every array shape written in `text` (layouts in braces carry no [dims])."""
    return [int(math.prod(int(d) for d in dims.split(",") if d) * _dtype_bytes(dt)) for dt, dims in _ARRAY.findall(text)]


def _split_instruction(line: str):
    """'%x = SHAPE opcode(operands), attrs' -> (name, shape, opcode, rest) or None."""
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    m = re.match(r"%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple shape: find its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    return m.group(1), shape, op.group(1), rest[op.end() - 1:]


def _operands(rest: str) -> str:
    """The text of the top-level operand list of an instruction (rest starts at its '(')."""
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[1:i]
    return rest


def _group_size(attrs: str) -> int | None:
    if m := _GROUPS_LIST.search(attrs):
        return len([d for d in m.group(1).split(",") if d])
    if m := _GROUPS_IOTA.search(attrs):
        return int(m.group(2))
    if m := _GROUPS_MESH.search(attrs):
        sizes = dict(re.findall(r"'?([\w]+)'?=(\d+)", m.group(1)))
        axes = re.findall(r"'([\w]+)'", m.group(2))
        return math.prod(int(sizes[a]) for a in axes if a in sizes) if axes else None
    return None


@dataclasses.dataclass(frozen=True)
class Loop:
    """One while loop: its trip count (None if the HLO does not show it) and how often it starts per call."""

    trips: int | None
    starts: int


def _parse(hlo_text: str):
    """Instructions by computation (in text order), shapes by instruction, runs per call by computation,
    the loops, and the computations inside a loop of unknown trip count."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
        elif parsed := _split_instruction(line):
            comps[current].append(parsed)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text; pass compiled.as_text().")
    shapes = {inst: shape for insts in comps.values() for inst, shape, _, _ in insts}

    def trip_count(attrs: str, condition: str) -> int | None:
        if m := _TRIP.search(attrs):
            return int(m.group(1))
        # jax's scan: the condition compares a counter counting up from 0 with a constant, direction=LT.
        consts = {inst: int(c.group(1)) for inst, _, op, rest in comps.get(condition, ())
                  if op == "constant" and (c := _CONSTANT.search(op + rest))}
        for _, _, op, rest in comps.get(condition, ()):
            if op == "compare" and "direction=LT" in rest:
                for operand in re.findall(r"%([\w.\-]+)", _operands(rest)):
                    if operand in consts:
                        return consts[operand]
        return None

    # The text lists callees before their callers (ENTRY last): walk it backwards from ENTRY.
    runs: dict[str, int] = defaultdict(int)
    runs[entry] = 1
    loops: list[Loop] = []
    unknown: set[str] = set()  # computations inside a loop of unknown trip count
    for name in reversed(list(comps)):
        if not runs[name]:
            continue
        for _, _, op, rest in comps[name]:
            callees = list(_CALLEE.findall(rest))
            for kind, names in _CALLEE_LIST.findall(rest):
                callees += [(kind, c.strip().lstrip("%")) for c in names.split(",") if c.strip()]
            trips = 1
            if op == "while":
                found = trip_count(rest, dict(callees).get("condition"))
                loops.append(Loop(found, runs[name]))
                trips = 1 if found is None else found
                if found is None:
                    unknown.add(dict(callees).get("body", ""))
            for kind, callee in callees:
                runs[callee] += runs[name] * (trips if kind in ("body", "condition") else 1)
                if name in unknown:
                    unknown.add(callee)
    return comps, shapes, runs, loops, unknown


def loops(hlo_text: str) -> list[Loop]:
    """Every while loop of the program that runs, outermost first."""
    return _parse(hlo_text)[3]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in an optimized HLO module (`compiled.as_text()`), with its runs per call.

    Raises:
      ValueError: a collective sits in a loop whose trip count the HLO does not
        show (its runs per call would be a guess).
    """
    comps, shapes, runs, _, unknown = _parse(hlo_text)
    found = []
    for name, insts in comps.items():
        for inst, shape, op, rest in insts:
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES or not runs[name]:
                continue
            if name in unknown:
                raise ValueError(f"{base} {inst} sits in a loop whose trip count the HLO does not show; "
                                 "its bytes per call are unknown.")
            out = _array_bytes(shape)
            # An async start's result is a tuple (operands, result[, contexts]): take the result alone.
            out_bytes = max(out, default=0) if op.endswith("-start") else sum(out)
            operands = re.findall(r"%([\w.\-]+)", _operands(rest))
            # ragged-all-to-all(input, output, offsets and sizes...): its output operand is the result's
            # buffer, so the rows a device may send are the input's alone.
            operands = operands[:1] if base == "ragged-all-to-all" else operands
            in_bytes = sum(b for o in operands for b in _array_bytes(shapes.get(o, "")))
            op_name = _OP_NAME.search(rest)
            found.append(Collective(base, shape, max(out_bytes, in_bytes), _group_size(rest), runs[name],
                                    op_name.group(1) if op_name else ""))
    return found


def entry_copy_bytes(hlo_text: str) -> int:
    """Bytes the top level of the program moves in layout copies (each read once and written once),
    e.g. a loop-carried buffer whose layout inside the loop differs from the program's arguments."""
    comps, _, _, _, _ = _parse(hlo_text)
    entry = list(comps)[-1]  # the text ends with ENTRY
    total = 0
    for _, shape, op, _ in comps[entry]:
        if op == "copy":
            total += 2 * sum(_array_bytes(shape))
        elif op == "copy-start":  # (destination, source, context): one array's worth
            total += 2 * max(_array_bytes(shape), default=0)
    return total


def total_bytes(found: list[Collective]) -> int:
    """Bytes every device sends or receives through collectives in one call of the program."""
    return sum(c.bytes_per_call for c in found)
