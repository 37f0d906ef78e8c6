"""Every tensor the package hands to a torch.distributed collective is created on the compute device (NCCL refuses
host tensors; on CPU the bug is invisible at run time, so it is checked in the source), and microbatches reach the
model through the one `to_device`."""

import ast
from pathlib import Path

import torch

from megatron_r1v3.training.step import to_device

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_r1v3"
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather", "scatter", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "send", "recv", "isend", "irecv"}
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "as_tensor"}


def _tensor_name(node: ast.expr) -> str | None:
    """`x` of `x`, `x.contiguous()`, `x.float()` ..."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        node = node.func.value
    return node.id if isinstance(node, ast.Name) else None


def _host_factory(value: ast.expr) -> bool:
    """A `torch.<factory>(...)` call without `device=`."""
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and isinstance(value.func.value, ast.Name) and value.func.value.id == "torch"
            and value.func.attr in FACTORIES and not any(k.arg == "device" for k in value.keywords))


def host_tensors_in_collectives(source: str, path: str = "<src>") -> list[str]:
    problems = []
    tree = ast.parse(source)
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
            f = call.func
            if not (isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and isinstance(f.value, ast.Name)
                    and f.value.id == "dist" and call.args):
                continue
            name = _tensor_name(call.args[0])
            if name and any(_host_factory(v) for v in assigned.get(name, [])):
                problems.append(f"{path}:{call.lineno} dist.{f.attr}({name}) on a tensor created without device=")
    return problems


def test_no_collective_on_a_host_created_tensor():
    problems = [p for f in sorted(PACKAGE.rglob("*.py"))
                for p in host_tensors_in_collectives(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert not problems, "\n".join(problems)


def test_the_audit_catches_the_nccl_bug():
    bad = ("def count(local):\n    t = torch.tensor([float(local)], dtype=torch.float64)\n"
           "    dist.all_reduce(t, group=g)\n")
    good = bad.replace("dtype=torch.float64", "dtype=torch.float64, device=compute_device()")
    assert host_tensors_in_collectives(bad) and not host_tensors_in_collectives(good)
    assert host_tensors_in_collectives("def f():\n    x = torch.zeros(3)\n    dist.send(x.contiguous(), 1)\n")


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "num_images": 3, "pixel_values": torch.zeros(1, 3, 2, 2)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["pixel_values"].device.type == "meta"
    assert moved["num_images"] == 3 and batch["input_ids"].device.type == "cpu"  # the host batch is untouched
    same = to_device(batch, torch.device("cpu"))
    assert same["input_ids"] is batch["input_ids"]  # already there: no copy
