"""Every torch call the library makes is accepted by the oldest torch it supports (issue 11).

CI runs a newer torch than the GPU machines (2.11), so a keyword that only newer torch knows
(``new_group(sort_ranks=...)``: TypeError on 2.11, the worker could not start at world > 1)
passes every CPU test. Two checks:

* a table of the ``torch.distributed`` names the library uses and, for the functions, the
  parameters torch 2.11 accepts; an AST scan of ``eplb_triton/`` checks every ``dist.X`` /
  ``torch.distributed.X`` use (and the keywords of ``torch.X`` calls that pass keywords)
  against it;
* behaviour: a worker at world 2 is built with ``torch.distributed.new_group`` replaced by one
  with torch 2.11's signature.

The table: torch 2.11 parameters, read from torch's ``distributed_c10d.py`` (a keyword present
in an earlier release and in the current one was present in 2.11: torch deprecates before it
removes, and none of these was removed). ``sort_ranks`` (new_group) and ``group_peer``
(P2POp) are newer than 2.11 and deliberately absent: use them only behind a feature check.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import numpy as np
import pytest
import torch
import torch.distributed as dist

import eplb_triton
from eplb_triton.testing.launch import run_ranks

MIN_TORCH = "2.11"

# name -> parameters (in order; all may be passed by keyword), or None for non-callables.
TORCH_DIST_211: dict[str, tuple[str, ...] | None] = {
    "new_group": ("ranks", "timeout", "backend", "pg_options", "use_local_synchronization", "group_desc", "device_id"),
    "init_process_group": (
        "backend", "init_method", "timeout", "world_size", "rank", "store", "group_name", "pg_options", "device_id",
    ),
    "destroy_process_group": ("group",),
    "all_reduce": ("tensor", "op", "group", "async_op"),
    "all_gather_object": ("object_list", "obj", "group"),
    "broadcast_object_list": ("object_list", "src", "group", "device"),
    "barrier": ("group", "async_op", "device_ids"),
    "batch_isend_irecv": ("p2p_op_list",),
    "P2POp": ("op", "tensor", "peer", "group", "tag"),
    "isend": ("tensor", "dst", "group", "tag"),
    "irecv": ("tensor", "src", "group", "tag"),
    "get_backend": ("group",),
    "get_rank": ("group",),
    "get_world_size": ("group",),
    "get_global_rank": ("group", "group_rank"),
    "get_process_group_ranks": ("group",),
    "is_available": (),
    "is_initialized": (),
    "ReduceOp": None,
    "ProcessGroup": None,
    "group": None,  # dist.group.WORLD
    "distributed_c10d": None,  # worker.py reads _world.pg_group_ranks (there since torch 2.0)
    "default_pg_timeout": None,  # a timedelta: the step board's longest wait without timeout_s
}

# torch.X calls that pass keywords: the keywords torch 2.11 accepts (positional use is not checked).
TORCH_211_KEYWORDS: dict[str, set[str]] = {
    "torch.empty": {"dtype", "device", "pin_memory", "requires_grad", "layout", "memory_format", "out"},
    "torch.zeros": {"dtype", "device", "pin_memory", "requires_grad", "layout", "out"},
    "torch.ones": {"dtype", "device", "pin_memory", "requires_grad", "layout", "out"},
    "torch.full": {"dtype", "device", "pin_memory", "requires_grad", "layout", "out"},
    "torch.arange": {"dtype", "device", "pin_memory", "requires_grad", "layout", "out"},
    "torch.tensor": {"dtype", "device", "pin_memory", "requires_grad"},
    "torch.as_tensor": {"dtype", "device"},
    "torch.frombuffer": {"dtype", "count", "offset", "requires_grad"},
    "torch.cuda.Stream": {"device", "priority"},
    "torch.cuda.Event": {"enable_timing", "blocking", "interprocess"},
}

# `**kwargs` passed to a torch.distributed call: allowed only from these feature-checked helpers.
FEATURE_CHECKED_SPLATS = {"_keep_rank_order"}

PACKAGE = pathlib.Path(eplb_triton.__file__).parent


def _dist_aliases(tree: ast.Module) -> tuple[set[str], dict[str, str]]:
    """Names bound to ``torch.distributed`` and names imported from it (local -> torch name)."""
    modules, names = {"torch.distributed"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed" and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for alias in node.names:
                if alias.name == "distributed":
                    modules.add(alias.asname or "distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
    return modules, names


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _uses(package: pathlib.Path = PACKAGE) -> list[tuple[str, int, str, ast.Call | None]]:
    """``(file, line, torch name, call or None)`` for every torch.distributed use and every
    ``torch.X`` call with keywords in the package."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        modules, imported = _dist_aliases(tree)
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute):
                dotted = _dotted(node)
                if dotted is None:
                    continue
                for module in modules:
                    if dotted.startswith(module + ".") and dotted.count(".") == module.count(".") + 1:
                        name = "dist." + node.attr
                if name is None and dotted.startswith("torch.") and id(node) in calls and calls[id(node)].keywords:
                    name = dotted
            elif isinstance(node, ast.Name) and node.id in imported and isinstance(node.ctx, ast.Load):
                name = "dist." + imported[node.id]
            if name is not None:
                found.append((path.name, node.lineno, name, calls.get(id(node))))
    return found


def _problems(package: pathlib.Path = PACKAGE) -> list[str]:
    problems = []
    for file, line, name, call in _uses(package):
        where = f"{file}:{line}: {name}"
        if name.startswith("dist."):
            short = name[len("dist."):]
            if short not in TORCH_DIST_211:
                problems.append(f"{where} is not in TORCH_DIST_211: add its torch {MIN_TORCH} parameters (or feature-check it)")
                continue
            params = TORCH_DIST_211[short]
            if call is None:
                continue
            if params is None:
                problems.append(f"{where} is called but the table lists it as not callable")
                continue
            if len(call.args) > len(params) or any(isinstance(a, ast.Starred) for a in call.args):
                problems.append(f"{where}: {len(call.args)} positional arguments, torch {MIN_TORCH} takes {params}")
            keywords = [k.arg for k in call.keywords]
        else:
            if name not in TORCH_211_KEYWORDS:
                problems.append(f"{where} passes keywords but is not in TORCH_211_KEYWORDS: add what torch {MIN_TORCH} accepts")
                continue
            params = TORCH_211_KEYWORDS[name]
            keywords = [k.arg for k in call.keywords]
        for k, keyword in zip(call.keywords, keywords):
            if keyword is None:
                helper = k.value.func.id if isinstance(k.value, ast.Call) and isinstance(k.value.func, ast.Name) else None
                if helper not in FEATURE_CHECKED_SPLATS:
                    problems.append(f"{where}: **{ast.unparse(k.value)} cannot be checked; build it in a feature-checked helper")
            elif keyword not in params:
                problems.append(f"{where}: keyword {keyword!r} is not accepted by torch {MIN_TORCH}")
    return problems


def test_every_torch_call_fits_the_minimum_torch():
    uses = _uses()
    assert any(name == "dist.new_group" for _, _, name, _ in uses), "the scan misses the worker's group creation"
    assert _problems() == []


def test_the_table_matches_this_torch():
    """Each table entry exists here with at least those parameters (a typo in the table, or a
    parameter this torch renamed, fails here)."""
    for name, params in TORCH_DIST_211.items():
        assert hasattr(dist, name), name
        if params is not None:
            try:
                here = inspect.signature(getattr(dist, name)).parameters
            except ValueError:  # a C++ class without a signature: list it with () and call it on the GPUs
                assert params == (), (name, params)
                continue
            assert list(here)[: len(params)] == list(params), (name, list(here))
    for name, keywords in TORCH_211_KEYWORDS.items():
        target = eval(name, {"torch": torch})  # noqa: S307 - names from the table above
        try:
            here = set(inspect.signature(target).parameters)
        except (TypeError, ValueError):  # C builtins without a signature: checked by calling on CPU below
            continue
        assert keywords <= here, (name, keywords - here)


def test_the_scan_catches_a_keyword_the_minimum_rejects(tmp_path):
    """The scan itself: the call the worker made before the fix is reported."""
    (tmp_path / "bad.py").write_text(
        "import torch.distributed as dist\n"
        "def make(ranks):\n"
        "    return dist.new_group(ranks, backend='gloo', use_local_synchronization=True, sort_ranks=False)\n"
        "def splat(ranks, extra):\n"
        "    return dist.new_group(ranks, **extra)\n"
        "def unknown(x):\n"
        "    return dist.all_to_all_single(x, x)\n"
    )
    problems = _problems(tmp_path)
    assert any("keyword 'sort_ranks' is not accepted" in p for p in problems), problems
    assert any("**extra cannot be checked" in p for p in problems), problems
    assert any("all_to_all_single is not in TORCH_DIST_211" in p for p in problems), problems


# -- behaviour: a worker built against torch 2.11's new_group ----------------------------------
def _new_group_211(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False, group_desc=None, device_id=None):
    """``new_group`` with torch 2.11's parameters (no sort_ranks), forwarding to this torch's."""
    return _NEW_GROUP(
        ranks=ranks,
        timeout=timeout,
        backend=backend,
        pg_options=pg_options,
        use_local_synchronization=use_local_synchronization,
        group_desc=group_desc,
        device_id=device_id,
    )


_NEW_GROUP = dist.new_group


def test_stand_in_has_the_table_signature():
    assert tuple(inspect.signature(_new_group_211).parameters) == TORCH_DIST_211["new_group"]


def _rank_worker_on_211(rank, world):
    from eplb_triton import TransferWorker
    from eplb_triton.testing.synthetic import TensorSpec, fill_rank_weights, make_rank_weights, row_mismatches

    dist.new_group = _new_group_211  # this forked rank only
    old = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    new = np.array([[2, 3, 0, 1], [1, 1, 3, 3]])
    weights = make_rank_weights([TensorSpec((4,), torch.float32)], 2, 2)
    fill_rank_weights(weights, old, rank)
    with TransferWorker(weights, timeout_s=30.0) as worker:
        worker.submit(old, new)
        while worker.busy:
            worker.step()
        worker.wait()
    return row_mismatches(weights, old, new, rank)


def test_worker_starts_and_transfers_with_the_minimum_torch_new_group():
    results = run_ranks(2, _rank_worker_on_211, backend="gloo", timeout_s=120.0, group_timeout_s=30.0)
    assert results == [[], []]


def test_keep_rank_order_asks_only_what_new_group_accepts(monkeypatch):
    from eplb_triton.worker.groups import _keep_rank_order

    monkeypatch.setattr(dist, "new_group", _new_group_211)
    assert _keep_rank_order([0, 1, 2]) == {}
    with pytest.raises(ValueError, match="not ascending"):
        _keep_rank_order([1, 0])
    monkeypatch.setattr(dist, "new_group", _NEW_GROUP)
    if "sort_ranks" in inspect.signature(_NEW_GROUP).parameters:
        assert _keep_rank_order([1, 0]) == {"sort_ranks": False}
