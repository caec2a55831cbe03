"""The `autotune` commands, one module per job; `autotune/cli.py` assembles them into one click group.

  common.py    what every command shares: problem and filter flags, opening the database, clear errors, tables
  search.py    `search` (the claims of a shapes list are autotune/scheduler.py's; the search itself autotune/search.py)
  listing.py   `list` and `show`
  transfer.py  `export`, `import` and `prune`
  bench.py     `bench`
  report.py    `report`
  targets.py   `targets` (the compile targets)
"""
