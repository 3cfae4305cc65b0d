"""Bounded fuzzing of the readers: mutated TIFF, OME-TIFF, PNG and OME-Zarr inputs either
read fine or raise a one-line InputError naming the file; nothing else escapes.

The long run (10,000+ inputs) is ``pipelines/fuzz_readers.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reader_fuzz import make_seeds, mutate_input, read_everything


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_cases")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed_index=st.integers(0, 5), mutation_seed=st.integers(0, 2**32 - 1))
def test_mutated_inputs_read_or_fail_clearly(
    seeds: list[Path], work: Path, seed_index: int, mutation_seed: int
) -> None:
    logging.getLogger("wsi_deepr").setLevel(logging.ERROR)
    seed = seeds[seed_index]
    rng = np.random.default_rng(mutation_seed)
    case = mutate_input(seed, work / ("case" + "".join(seed.suffixes)), rng)
    outcome = read_everything(case)
    assert outcome.kind != "crash", outcome.detail
