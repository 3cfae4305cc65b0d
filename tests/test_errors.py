"""User-facing errors survive pickling (they travel back from dask.distributed workers)."""

from __future__ import annotations

import pickle

from wsi_deepr.errors import InputError, InternalError, ModelError


def test_errors_round_trip_through_pickle() -> None:
    for error in (
        InputError("slide.svs", "truncated file"),
        ModelError("m.onnx", "3 channels, slide has 1", hint="pass --model"),
        InternalError("run", "bug"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert back.one_line() == error.one_line()
        assert back.exit_code == error.exit_code
    assert ModelError("m.onnx", "x", hint="pass --model").one_line() == "m.onnx: x (pass --model)"


def test_unexpected_exceptions_become_one_line_with_exit_code_1() -> None:
    from wsi_deepr.cli import internal_error

    error = internal_error(ValueError("first line\nsecond line"))
    assert error.exit_code == 1
    assert error.one_line() == (
        "internal error: ValueError: first line "
        "(a bug in wsi-deepr: rerun with --debug and report the traceback)"
    )
    assert internal_error(MemoryError()).one_line().startswith("out of memory: ")
