"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, data, model directory), not a bug.

    The message must name the input and say what was expected.
    """


class TrainingDiverged(UserError):
    """A loss became NaN/inf; nothing from the diverged run is saved."""


class TrainingCollapsed(UserError):
    """The collapse guard tripped before any state above its floor: nothing is saved."""
