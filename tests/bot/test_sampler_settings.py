"""A1111's sampler settings in [defaults]: they fill a request that does not name them,
an option wins over them, and a bad value fails at startup naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.commands import parse_args
from bot.draw import _eta, freeze, new_draft, options_from_request
from bot.options import draw_options
from bot.reruns import options_from_infotext
from bot.settings import ConfigError, parse_settings
from bot.types import Actor
from pipeline.checkpoints import CheckpointLibrary
from tests.conftest import make_settings


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


# -- CFG denoiser settings and Downcast alphas_cumprod -------------------------------------------

ALICE = Actor(platform="console", user_id="alice", name="Alice", locale="en", chat_id="c")


def _frozen(tmp_path: Path, line: str, **defaults):
    settings = make_settings(tmp_path, defaults=defaults)
    parsed = parse_args(line)
    options = draw_options().convert(parsed, settings.limits)
    draft = new_draft(parsed.text, options, settings)
    return freeze(draft, ALICE, settings, CheckpointLibrary(tmp_path / "models")).generation


def test_guidance_settings_come_from_defaults_and_options(tmp_path: Path) -> None:
    plain = _frozen(tmp_path, "a cat")
    assert (plain.s_min_uncond, plain.s_min_uncond_all, plain.skip_early_cond) == (0.0, False, 0.0)
    assert not (plain.pad_cond_uncond or plain.pad_cond_uncond_v0 or plain.downcast_alphas_cumprod)
    configured = _frozen(
        tmp_path,
        "a cat",
        s_min_uncond=1.5,
        skip_early_cond=0.1,
        pad_cond_uncond=True,
        downcast_alphas_cumprod=True,
    )
    assert (configured.s_min_uncond, configured.skip_early_cond) == (1.5, 0.1)
    assert configured.pad_cond_uncond and configured.downcast_alphas_cumprod
    typed = _frozen(
        tmp_path,
        "a cat --ngms 2 --ngms-all-steps --skip-early-cfg 0.25 --pad-conds --pad-conds-v0 --downcast-alphas-cumprod",
    )
    assert (typed.s_min_uncond, typed.s_min_uncond_all, typed.skip_early_cond) == (2.0, True, 0.25)
    assert typed.pad_cond_uncond and typed.pad_cond_uncond_v0 and typed.downcast_alphas_cumprod
    # a reroll rebuilds the same request from its options
    again = options_from_request(typed)
    assert (again["ngms"], again["ngms-all-steps"], again["pad-conds"]) == (2.0, True, True)


def test_guidance_fields_of_an_infotext_become_options() -> None:
    text = (
        "a cat\nSteps: 6, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, NGMS: 1.5, "
        "NGMS all steps: True, Skip Early CFG: 0.2, Pad conds: True, Downcast alphas_cumprod: True"
    )
    _, options = options_from_infotext(text, None, with_model=False)
    assert {key: options[key] for key in ("ngms", "ngms-all-steps", "skip-early-cfg")} == {
        "ngms": 1.5,
        "ngms-all-steps": True,
        "skip-early-cfg": 0.2,
    }
    assert options["pad-conds"] and options["downcast-alphas-cumprod"]
    assert "pad-conds-v0" not in options
    assert draw_options().check(options, parse_settings({}).limits)["pad-conds"] is True


def test_an_old_infotext_turns_on_its_back_compat_options() -> None:
    """§12.2 step 6: before 1.6.0 DDIM implies "Pad conds v0", before v1.7.0-225
    "Downcast alphas_cumprod"; the paste applies both."""
    old = "a cat\nSteps: 6, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 64x64, Version: v1.5.1"
    _, options = options_from_infotext(old, None, with_model=False)
    assert options["pad-conds-v0"] is True and options["downcast-alphas-cumprod"] is True
    new = old.replace("v1.5.1", "v1.10.1")
    _, options = options_from_infotext(new, None, with_model=False)
    assert "pad-conds-v0" not in options and "downcast-alphas-cumprod" not in options


@pytest.mark.parametrize(("key", "value"), [("skip_early_cond", 1.5), ("s_min_uncond", -0.1)])
def test_bad_guidance_settings_fail_at_startup(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        _settings(**{key: value})


def test_unipc_lower_order_final_comes_from_defaults_and_options(tmp_path: Path) -> None:
    assert _frozen(tmp_path, "a cat").uni_pc_lower_order_final is True
    assert _frozen(tmp_path, "a cat", uni_pc_lower_order_final=False).uni_pc_lower_order_final is False
    typed = _frozen(tmp_path, "a cat --sampler UniPC --unipc-lower-order-final false")
    assert typed.uni_pc_lower_order_final is False
    assert options_from_request(typed)["unipc-lower-order-final"] == "False"
