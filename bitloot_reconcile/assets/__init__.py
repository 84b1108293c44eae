"""Assets of the code location and their schedules; `definitions.py` assembles them."""
