"""What a call raised, as text the ranks of a distributed test can return and compare."""


def error_of(call) -> str:
    """``"ValueError: message"`` (or TypeError) when ``call()`` raises one, else ``"no error"``."""
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"
