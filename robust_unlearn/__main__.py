"""``python -m robust_unlearn ...`` (what ``accelerate launch -m robust_unlearn`` runs): the CLI."""
import sys

from .cli import main

sys.exit(main())
