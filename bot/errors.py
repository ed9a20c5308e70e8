"""The error family the user may see.

``UserError`` carries a catalog key and parameters; its text is safe to show and is
rendered in the user's language by ``bot.i18n``. Anything that is not a ``UserError``
(or an engine error the service converts into one) is a bug: the user gets
"something went wrong (ref <id>)" and the trace is logged under that ref.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input or a refused request; the message names what is allowed."""

    def __init__(self, key: str, **params: Any) -> None:
        super().__init__(key)
        self.key = key
        self.params = params

    def __str__(self) -> str:
        from bot.i18n import default_translator

        return default_translator().t("en", self.key, **self.params)


class CommandSyntaxError(UserError):
    """The command text does not follow the grammar (unclosed quote, unknown option ...)."""


class OptionValueError(UserError):
    """An option's value is outside its allowed range or of the wrong type."""


class NotFound(UserError):
    """A generation, image or action the user named does not exist (or is not theirs)."""


class PermissionDenied(UserError):
    """The actor may not do this."""


class ImageStoreError(UserError):
    """The image store did not take or give back an image, after its own retries (an
    object store that cannot be reached, a full disk); trying again later may work."""
