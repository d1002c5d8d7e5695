"""Boolean options from JSON and from the command line (scripts/flags.py)."""

import pytest

from scripts.flags import as_flag


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("true", True), ("false", False), ("True", True), ("FALSE", False),
     (" yes ", True), ("no", False), ("1", True), ("0", False), (1, True), (0, False)],
)
def test_as_flag(value, expected):
    assert as_flag(value, "--overwrite") is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "ture", None, 0.5])
def test_as_flag_rejects_anything_else(value):
    with pytest.raises(ValueError, match="--overwrite must be true or false"):
        as_flag(value, "--overwrite")
