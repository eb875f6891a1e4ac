"""One wording for every "unknown ..." message: a leaf module, so that the config and the model
registry can both use it without importing each other."""

import difflib


def did_you_mean(wrong: str, candidates: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate to a mistyped name, or ``""``: the one
    wording of every "unknown ..." message (keys, sections, choices, models, distributions, files)."""
    close = difflib.get_close_matches(str(wrong), candidates, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
