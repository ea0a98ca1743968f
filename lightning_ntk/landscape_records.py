"""``/landscape/...``: results of spawning written into a finished run file (docs/format.md).

Tables (append tables of format v1; one call of ``spawn_children`` adds rows per parent state):

* ``/landscape/spawn_pairs``    one row per pair of children of one spawn step (axis ``pair``)
* ``/landscape/spawn_children`` one row per child (axis ``child_row``)
* ``/landscape/linearized``     one row per linearisation time (axis ``step``)
* ``/landscape/slices``         one 1-D loss slice per parent state (axis ``step``)

The run's writer is gone by then, so the file is rewritten the way the store resumes one
(:class:`~lightning_ntk.store.RunStore` with ``resume=True``: the file is rebuilt beside
itself, changed there and renamed over it), and a crash leaves the old file or the new one.
A table is rewritten whole, sorted by its key: rows of a spawn step measured again are
replaced, the others kept. Rows measured with other settings (points on a path, kernel
kind, evaluation set, probe size) are not mixed into one table: refused unless ``replace``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from .store import Field, RunStore, StoreError, open_run

GROUP = "landscape"
PAIRS = "landscape/spawn_pairs"
CHILDREN = "landscape/spawn_children"
LINEARIZED = "landscape/linearized"
SLICES = "landscape/slices"
#: The owner name of the post-hoc writer (never a monitor's state key).
_OWNER = "lightning_ntk.spawn_children"


def pair_fields(points: int) -> List[Field]:
    return [
        Field("spawn_step", (), "int64", attrs={"description": "optimizer steps of the parent state"}),
        Field("spawn_epoch", (), "float64", attrs={"description": "epoch of the parent state"}),
        Field("trained_to", (), "int64", attrs={"description": "the step both children trained to"}),
        Field("child_a", (), "int64"), Field("child_b", (), "int64"),
        Field("seed_a", (), "int64"), Field("seed_b", (), "int64"),
        Field("error_barrier", attrs={"description": "max over the linear path of the error minus the mean of the "
                                                     "ends (Frankle et al. 2020)"}),
        Field("loss_barrier", attrs={"description": "the same on the loss"}),
        Field("weight_distance", attrs={"description": "L2 distance of the trainable parameters"}),
        Field("disagreement", attrs={"description": "fraction of probe units whose predicted class differs"}),
        Field("kernel_distance", attrs={"description": "1 - <K_a, K_b>_F / (|K_a|_F |K_b|_F) of the eNTKs on the "
                                                       "probe (Fort et al. 2020)"}),
        Field("path_error", (points,), dims=("alpha",)), Field("path_loss", (points,), dims=("alpha",)),
    ]


def child_fields() -> List[Field]:
    return [
        Field("spawn_step", (), "int64"), Field("spawn_epoch", (), "float64"), Field("trained_to", (), "int64"),
        Field("child", (), "int64"), Field("seed", (), "int64"),
        Field("error", attrs={"description": "the child's error on the evaluation set"}),
        Field("loss", attrs={"description": "the child's loss on the evaluation set"}),
        Field("distance_to_parent", attrs={"description": "L2 distance of the trainable parameters to the parent"}),
        Field("kernel_distance_to_parent", attrs={"description": "kernel distance of the child's eNTK to the "
                                                                 "parent's"}),
        Field("parent_norm", attrs={"description": "L2 norm of the parent's trainable parameters"}),
    ]


def linearized_fields() -> List[Field]:
    return [
        Field("step", (), "int64", attrs={"description": "the linearisation time t (parent state)"}),
        Field("epoch", (), "float64"), Field("trained_to", (), "int64"), Field("seed", (), "int64"),
        Field("linear_error"), Field("linear_loss"),
        Field("real_error", attrs={"description": "the network trained alike from the same state (child 0)"}),
        Field("real_loss"),
        Field("parent_error", attrs={"description": "the network at the linearisation time"}),
        Field("parent_loss"),
    ]


def slice_fields(n: int) -> List[Field]:
    return [
        Field("step", (), "int64", attrs={"description": "the parent state the slice is centred on"}),
        Field("epoch", (), "float64"),
        Field("loss", (n,), dims=("coordinate",), attrs={"description": "loss at theta_t + a d, a = coordinate"}),
        Field("error", (n,), dims=("coordinate",)),
    ]


@dataclass
class LandscapeRows:
    """New rows of one ``/landscape`` table: ``columns`` by field (leading row axis);
    ``replaces``: key values whose earlier rows they replace; ``settings``: what the rows
    were measured with (rows of other settings are not mixed)."""

    group: str
    fields: List[Field]
    columns: Dict[str, np.ndarray]
    key: str
    row_dim: str
    settings: Dict[str, Any]
    replaces: Sequence[int] = ()
    attrs: Dict[str, Any] = field(default_factory=dict)
    coords: Dict[str, Any] = field(default_factory=dict)


def _columns(rows: LandscapeRows) -> Dict[str, np.ndarray]:
    """The new rows' columns as arrays of the declared dtypes and shapes."""
    out = {}
    for f in rows.fields:
        column = np.asarray(rows.columns[f.name], dtype=f.dtype)
        if column.shape[1:] != f.shape:
            raise ValueError(f"/{rows.group}: column {f.name!r} has rows of shape {column.shape[1:]}, declared {f.shape}")
        out[f.name] = column
    return out


def _old_rows(path: str, rows: LandscapeRows, new: Mapping[str, np.ndarray], replace: bool) -> Dict[str, np.ndarray]:
    """The file's rows of ``rows.group`` that stay (empty when there are none or ``replace``)."""
    names = [f.name for f in rows.fields]
    with open_run(path) as run:
        if rows.group not in run:
            return {n: new[n][:0] for n in names}
        view = run[rows.group]
        stored = view.attrs.get("settings", {})
        same_schema = [f.to_json() for f in rows.fields] == view.attrs.get("fields")
        if stored != rows.settings or not same_schema:
            if not replace:
                raise StoreError(
                    f"/{rows.group} in {path} holds rows measured with {json.dumps(stored, sort_keys=True)}; these "
                    f"are measured with {json.dumps(rows.settings, sort_keys=True)}. Pass the same settings, or "
                    "replace=True to drop the earlier rows")
            return {n: new[n][:0] for n in names}
        old = {n: view[n] for n in names}
    keep = ~np.isin(old[rows.key], np.asarray(list(rows.replaces), dtype=np.int64))
    return {n: v[keep] for n, v in old.items()}


def _merged(rows: LandscapeRows, path: str, replace: bool) -> Dict[str, np.ndarray]:
    new = _columns(rows)
    old = _old_rows(path, rows, new, replace)
    merged = {n: np.concatenate([old[n].astype(new[n].dtype), new[n]]) for n in new}
    order = np.argsort(merged[rows.key], kind="stable")
    return {n: v[order] for n, v in merged.items()}


def write_landscape(path: "os.PathLike[str] | str", tables: Sequence[LandscapeRows], *, replace: bool = False) -> None:
    """Merge ``tables`` into the finished run file ``path`` (see the module docstring)."""
    path = os.fspath(path)
    if RunStore.is_open(path):  # its training is still writing it in this process
        raise StoreError(f"run file {path} is still open for writing in this process (its training has not "
                         "ended); spawn children after Trainer.fit returns")
    merged = [(rows, _merged(rows, path, replace)) for rows in tables]  # checked before writing
    store = RunStore.acquire(path, owner=_OWNER, resume=True)
    try:
        history = json.loads(store.file.attrs.get("history", "[]"))
        if history and history[-1].get("event") == "resumed":
            history[-1] = {**history[-1], "event": "landscape",
                           "groups": sorted({rows.group for rows in tables})}
            store.file.attrs["history"] = json.dumps(history, sort_keys=True)
        for rows, columns in merged:
            if rows.group in store.file:
                del store.file[rows.group]
            attrs = {**rows.attrs, "settings": rows.settings}
            table = store.declare_table(rows.group, rows.fields, key=rows.key, row_dim=rows.row_dim, attrs=attrs,
                                        coords=rows.coords)
            if len(columns[rows.key]):
                table.extend(columns)
        store.flush()
    except BaseException:
        store.abandon()  # the run file stays as it was
        raise
    store.release(_OWNER)

