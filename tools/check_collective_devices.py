"""Static guard: no CPU tensor may reach a tensor collective.

NCCL only moves CUDA tensors, and CI has only gloo, which accepts CPU tensors: a `.cpu()` copy (or a tensor
created without a device) handed to `all_reduce`/`broadcast`/`send`/... passes every CPU test and fails on the
first multi-GPU run. This check reads the source of the training packages and flags every tensor collective whose
tensor argument is, in its own function, built by `.cpu()`, `.to("cpu")`, `device="cpu"`,
or a tensor factory (`torch.tensor`, `torch.zeros`, ...) without a `device=` argument. Object collectives
(`broadcast_object_list`, `all_gather_object`, DCP's) choose the backend's device themselves and are not checked.

    python -m tools.check_collective_devices [paths...]   # exit 1 and one line per finding
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

COLLECTIVES = {
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "send", "recv", "isend",
    "irecv", "reduce", "gather", "scatter",
}
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "as_tensor",
             "from_numpy"}
DEFAULT_PATHS = ("pretrain", "parallel", "data", "cluster")


def _host_made(node: ast.AST) -> str | None:
    """Why an expression yields a CPU tensor, if it visibly does."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
            name = sub.func.attr
            if name == "cpu":
                return ".cpu()"
            if name == "to" and any(isinstance(a, ast.Constant) and a.value == "cpu" for a in sub.args):
                return '.to("cpu")'
            is_torch = isinstance(sub.func.value, ast.Name) and sub.func.value.id == "torch"
            keywords = {k.arg: k.value for k in sub.keywords}
            if is_torch and name in FACTORIES and "device" not in keywords:
                return f"torch.{name}(...) without device="
            device = keywords.get("device")
            if isinstance(device, ast.Constant) and device.value == "cpu":
                return 'device="cpu"'
    return None


def _tensor_args(call: ast.Call, name: str) -> list[ast.AST]:
    count = 2 if name.startswith(("all_gather", "reduce_scatter", "all_to_all")) else 1
    args = list(call.args[:count])
    args += [k.value for k in call.keywords if k.arg in ("tensor", "output", "input", "output_tensor", "input_tensor")]
    return args


def _collective_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
        owner = func.value
        if isinstance(owner, ast.Name) and owner.id in ("dist", "torch_dist"):
            return func.attr
        if isinstance(owner, ast.Attribute) and owner.attr == "distributed":
            return func.attr
    if isinstance(func, ast.Name) and func.id.lstrip("_") in {f"{c}_dim0" for c in ("all_gather", "reduce_scatter")}:
        return func.id.lstrip("_")
    return None


def check_source(source: str, filename: str) -> tuple[list[str], int]:
    """(findings, number of tensor collective calls checked)."""
    tree = ast.parse(source, filename)
    findings, checked = [], 0
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for function in functions:
        assignments: dict[str, list[ast.AST]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            assignments.setdefault(name.id, []).append(node.value)
        for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
            name = _collective_name(call)
            if name is None:
                continue
            checked += 1
            for arg in _tensor_args(call, name):
                sources = [arg] + [v for n in ast.walk(arg) if isinstance(n, ast.Name)
                                   for v in assignments.get(n.id, [])]
                for expr in sources:
                    reason = _host_made(expr)
                    if reason:
                        findings.append(f"{filename}:{call.lineno}: {name} gets a tensor made by {reason} "
                                        f"(line {expr.lineno}); NCCL needs it on the training device")
                        break
    return findings, checked


def check_paths(paths: list[str | Path]) -> tuple[list[str], int]:
    findings, checked = [], 0
    for root in paths:
        root = Path(root)
        for file in sorted([root] if root.is_file() else root.rglob("*.py")):
            found, count = check_source(file.read_text(), str(file))
            findings, checked = findings + found, checked + count
    return findings, checked


def main() -> None:
    paths = sys.argv[1:] or [str(Path(__file__).resolve().parents[1] / p) for p in DEFAULT_PATHS]
    findings, checked = check_paths(paths)
    print("\n".join(findings) or f"{checked} tensor collective calls checked: no CPU tensor reaches one")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
