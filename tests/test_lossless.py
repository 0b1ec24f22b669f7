"""compt.lossless: the gap in a metric's direction and units, tolerances, chance bands (issue 12 item 5)."""

import math

import pytest

from compt.lossless import MetricRule, Tolerance, at_chance, is_lossless, shortfall

TOP1 = MetricRule()  # a percentage: higher is better, the paper's 0.5 points
LOSS = MetricRule(higher_is_better=False, tolerance=Tolerance(absolute=0.01), unit="nats")


def test_shortfall_is_positive_when_worse_in_either_direction():
    assert shortfall(40.0, 39.5, higher_is_better=True) == pytest.approx(0.5)
    assert shortfall(4.10, 4.13, higher_is_better=False) == pytest.approx(0.03)
    assert shortfall(4.10, 4.05, higher_is_better=False) == pytest.approx(-0.05)


def test_lossless_within_the_tolerance_of_the_twin():
    assert is_lossless(39.6, 40.0, TOP1) and not is_lossless(39.4, 40.0, TOP1)
    assert is_lossless(4.105, 4.10, LOSS) and is_lossless(3.0, 4.10, LOSS)  # better is lossless too
    assert not is_lossless(4.12, 4.10, LOSS) and not is_lossless(math.nan, 4.10, LOSS)
    relative = MetricRule(higher_is_better=False, tolerance=Tolerance(relative=0.005))
    assert is_lossless(4.12, 4.10, relative) and not is_lossless(4.13, 4.10, relative)  # 0.0205 allowed


def test_tolerances_are_validated_and_described():
    for bad in ({"absolute": -0.1}, {"relative": 1.0}, {"absolute": math.inf}):
        with pytest.raises(ValueError, match="tolerance"):
            Tolerance(**bad)
    assert Tolerance(absolute=0.5).describe("%") == "0.5 points"
    assert Tolerance(absolute=0.01).describe("nats") == "0.01 nats"
    assert Tolerance(relative=0.002).describe("nats") == "0.2 % of the baseline"
    both = Tolerance(absolute=0.01, relative=0.002)
    assert both.describe("nats") == "the larger of 0.01 nats and 0.2 % of the baseline"
    assert both.allowed(10.0) == pytest.approx(0.02) and both.allowed(1.0) == pytest.approx(0.01)
    assert MetricRule.from_dict(LOSS.to_dict()) == LOSS


def test_a_loss_is_at_chance_just_below_its_chance_level():
    chance = {"chance/val_loss": math.log(256)}  # 5.545: the loss of embeddings that say nothing
    assert at_chance({"val_loss": 5.52, **chance}, "val_loss", higher_is_better=False)
    assert at_chance({"val_loss": 6.2, **chance}, "val_loss", higher_is_better=False)  # worse than blind
    assert not at_chance({"val_loss": 4.15, **chance}, "val_loss", higher_is_better=False)
    assert not at_chance({"val_loss": 4.15}, "val_loss", higher_is_better=False)  # no level recorded
