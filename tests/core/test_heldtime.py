"""A sweep experiment's held time (spotrun.heldtime): the tag's format, its 256-character
limit, its pricing (issue 19, a row's cost). The lifecycle adding its own time to what earlier
holders left on the volume: tests/core/test_lifecycle_endings.py."""
from spotrun import heldtime


def test_the_tag_round_trips_and_sums_one_key_and_skips_what_does_not_parse():
    held = heldtime.parse("p3.2xlarge@us-east-1a=100 p3.2xlarge@us-east-1a=20 "
                          "g4dn.xlarge@us-east-1b=5 junk =7 a@b=x")
    assert held == {"p3.2xlarge@us-east-1a": 120, "g4dn.xlarge@us-east-1b": 5}
    assert heldtime.format_tag(held) == "p3.2xlarge@us-east-1a=120 g4dn.xlarge@us-east-1b=5"
    assert heldtime.parse(heldtime.format_tag(held)) == held
    assert heldtime.parse(None) == {} and heldtime.parse("") == {}
    assert heldtime.add(held, "p3.2xlarge@us-east-1a", 9.7) == {**held, "p3.2xlarge@us-east-1a": 129}
    assert heldtime.add({}, "x@y", -5) == {"x@y": 0}


def test_the_tag_keeps_within_ec2s_256_characters_dropping_the_shortest_held():
    held = {f"p4d.24xlarge@us-east-1{chr(97 + n)}": 1000 * (n + 1) for n in range(12)}
    text = heldtime.format_tag(held)
    assert len(text) <= 256
    kept = heldtime.parse(text)
    assert set(kept) < set(held) and min(kept.values()) > max(
        v for k, v in held.items() if k not in kept)


def test_held_time_is_priced_by_type_and_zone_and_names_what_has_no_price():
    prices = {("m5.large", "us-east-1a"): 0.04, ("m5.large", "us-east-1b"): 0.02}
    usd, unpriced = heldtime.cost({"m5.large@us-east-1a": 3600, "m5.large@us-east-1b": 1800,
                                   "x9.huge@us-east-1a": 60}, prices)
    assert round(usd, 4) == 0.05 and unpriced == ["x9.huge@us-east-1a"]
