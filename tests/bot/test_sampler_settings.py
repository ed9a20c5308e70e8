"""A1111's sampler settings in [defaults]: they fill a request that does not name them,
an option wins over them, and a bad value fails at startup naming the key."""

from __future__ import annotations

import pytest

from bot.draw import _eta, new_draft
from bot.settings import ConfigError, parse_settings


def _settings(**defaults):
    return parse_settings({"defaults": defaults})


def test_eta_defaults_apply_per_sampler_kind_and_only_when_not_a1111s() -> None:
    plain = _settings()
    assert _eta(None, "Euler a", plain) is None and _eta(None, "DDIM", plain) is None
    tuned = _settings(eta_ancestral=0.5, eta_ddim=0.3)
    assert _eta(None, "Euler a", tuned) == 0.5
    assert _eta(None, "DDIM CFG++", tuned) == 0.3
    assert _eta(0.8, "DDIM", tuned) == 0.8


def test_sampler_setting_defaults_fill_the_draft() -> None:
    settings = _settings(s_churn=0.4, s_noise=1.002, schedule_rho=5.0, uni_pc_order=2, extra_noise=0.1)
    options = new_draft("a cat", {}, settings).options
    assert (options["s-churn"], options["s-noise"], options["schedule-rho"]) == (0.4, 1.002, 5.0)
    assert (options["unipc-order"], options["extra-noise"], options["s-tmax"]) == (2, 0.1, 0.0)
    assert new_draft("a cat", {"s-churn": 0.9}, settings).options["s-churn"] == 0.9


@pytest.mark.parametrize(
    ("key", "value"), [("s_churn", -1.0), ("eta_ddim", 2.0), ("uni_pc_variant", "bh3"), ("uni_pc_order", 0)]
)
def test_bad_sampler_settings_fail_at_startup(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        _settings(**{key: value})
