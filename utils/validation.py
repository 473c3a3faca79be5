"""The error every bad dataset raises, and the one check every loader runs on its arrays right after reading them."""

import numpy as np

NUMBERS = "biuf"  # numpy dtype kinds: bool, signed and unsigned integers, floats
KIND_NAMES = {"b": "bool", "i": "int", "u": "unsigned int", "f": "float"}


class DatasetError(RuntimeError):
    """A dataset is missing, unreadable, malformed or does not fit the environment; the message says how to fix it."""


def check_arrays(arrays: dict, source: str, layout: dict, hint: str = "") -> int:
    """Stop at the first problem of per-transition arrays with one line naming the source, the field and the fix.

    layout maps each field to (the shape of one row: () for a scalar, None for a size of any length, or the name of
    an earlier field whose row shape it must have; the dtype: a numpy dtype, or a string of allowed dtype kinds). Fields missing from `arrays`
    are skipped. Checked: dtype, rank and row shape, the same number of rows in every field, finite floats, at least
    one row. `hint` ends every message (e.g. the expected file layout). Returns the number of rows."""

    def fail(problem: str):
        raise DatasetError(f"{source}: {problem}" + (f"; {hint}" if hint else ""))

    first = None
    for name, (row_shape, dtype) in layout.items():
        if name not in arrays:
            continue
        array = arrays[name]
        if not dtype_fits(array.dtype, dtype):
            wanted = dtype if isinstance(dtype, np.dtype) else " or ".join(KIND_NAMES[k] for k in dtype)
            fail(f"{name} has dtype {array.dtype}, expected {wanted}: write it as numbers of that type")
        expected = arrays[row_shape].shape[1:] if isinstance(row_shape, str) else row_shape
        if array.ndim == 0 or not shape_fits(array.shape[1:], expected):
            wanted = ", ".join(["n", *("d" if size is None else str(size) for size in expected)])
            like = f" like {row_shape}" if isinstance(row_shape, str) else ""
            fail(f"{name} has shape {array.shape}, expected ({wanted}){like}: one row per transition")
        if first is None:
            first = (name, len(array))
        elif len(array) != first[1]:
            fail(f"{name} has {len(array)} rows but {first[0]} has {first[1]}: every field needs one row per transition")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
            fail(f"{name} is not finite at row {bad[0]} ({len(bad)} of {len(array)} rows): repair or drop those transitions")
    if first is None or first[1] == 0:
        fail("holds no transition: it is empty")
    return first[1]


def dtype_fits(dtype: np.dtype, expected) -> bool:
    return dtype == expected if isinstance(expected, np.dtype) else dtype.kind in expected


def shape_fits(row: tuple, expected: tuple) -> bool:
    return len(row) == len(expected) and all(e is None or e == r for r, e in zip(row, expected))
