"""The bottom layer: what every other part uses (atomic file I/O, locks, DDP collectives, seeding). It imports
nothing from autolora but `errors`."""
