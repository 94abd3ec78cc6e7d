"""Discovery: which files under a watch are finished, and which of them go to the journal.

- ``scan``: the filesystem walk and stat calls (blocking; run in worker threads).
- ``settle``: the settle rule, a tracker fed with observations and clock readings.
- ``admission``: the policy between a settled file and the journal (ready marker,
  names S3 cannot take, the gallery's folder rules, the first walk's remote check).
- ``watcher``: one watch's events, walks and settle loop, wiring the three above.
- ``plan``: the same walk and rules as a dry run, for ``cpg-daemon check``.
"""
