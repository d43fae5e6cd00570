"""The one exception type of the masking engine."""


class MaskingError(ValueError):
    """A masking configuration cannot be compiled (bad pattern, unknown detector, bad path...).

    The message names the offending item so that the rule-pack checker can report it next to
    ``file:line``.
    """
