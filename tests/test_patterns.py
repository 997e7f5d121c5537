"""Pattern parsing, validation and printing."""

import pytest

from losa.errors import ConfigError
from losa.pruning.patterns import Pattern


def test_parse_unstructured_and_nm():
    p = Pattern.parse("0.5")
    assert (p.sparsity, p.n, p.m, p.is_nm) == (0.5, 0, 0, False)
    q = Pattern.parse(" 2:4 ")
    assert (q.n, q.m, q.is_nm) == (2, 4, True)
    assert q.sparsity == 0.5
    assert Pattern.parse("4:8").sparsity == 0.5
    assert Pattern.parse("1:4").sparsity == 0.75
    assert Pattern.parse("0").sparsity == 0.0


def test_constructors_equal_parse():
    assert Pattern.unstructured(0.7) == Pattern.parse("0.7")
    assert Pattern.nm(2, 4) == Pattern.parse("2:4")
    assert Pattern(n=2, m=4) == Pattern.nm(2, 4)


@pytest.mark.parametrize("text", ["0.5", "0.7", "0.123456789", "0.0", "2:4", "4:8", "1:16"])
def test_str_round_trips(text):
    p = Pattern.parse(text)
    assert Pattern.parse(str(p)) == p


def test_str_forms():
    assert str(Pattern.nm(2, 4)) == "2:4"
    assert str(Pattern.unstructured(0.5)) == "0.5"


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_sparsity_outside_unit_interval_rejected(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        Pattern.unstructured(bad)
    with pytest.raises(ConfigError):
        Pattern.parse(str(bad))


@pytest.mark.parametrize("n, m", [(4, 4), (5, 4), (0, 4), (-1, 4), (2, -4)])
def test_n_must_be_less_than_m(n, m):
    with pytest.raises(ConfigError, match="N must be < M"):
        Pattern.nm(n, m)
    with pytest.raises(ConfigError, match="N must be < M"):
        Pattern.parse(f"{n}:{m}")


@pytest.mark.parametrize("junk", ["", "abc", "2:", ":4", "2:4:8", "a:b", "2.5:4", "50 %", "half"])
def test_junk_text_rejected_with_hint(junk):
    with pytest.raises(ConfigError, match="2:4"):
        Pattern.parse(junk)


def test_contradictory_fields_rejected():
    with pytest.raises(ConfigError):
        Pattern(sparsity=0.3, n=2, m=4)
    with pytest.raises(ConfigError):
        Pattern(n=2)


def test_check_width():
    Pattern.nm(2, 4).check_width(4096)
    Pattern.unstructured(0.5).check_width(4095)  # unstructured fits any width
    with pytest.raises(ConfigError) as info:
        Pattern.nm(4, 8).check_width(4092)
    message = str(info.value)
    assert "4092" in message and "M=8" in message and "unstructured" in message


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        Pattern.parse("junk")
