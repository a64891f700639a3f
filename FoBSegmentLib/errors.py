"""Errors the library raises for bad settings, naming the setting rather than a command-line flag.

Front ends turn `SettingError.field` into their own words: `fob` into the flag (`slices` ->
`--slices`), the Slicer module into the widget's label.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A bad value of one setting. str() is "<field>: <message>"; `field` is the setting's name
    (a `JobSettings` / `PropagationConfig` field or a request field such as `prompts_out`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def as_flag(self) -> str:
        """The message as the command line says it: `--field-name message`."""
        return f"--{self.field.replace('_', '-')} {self.message}"
