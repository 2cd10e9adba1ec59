"""Benchmarks of every fast path against its reference (``mosaic-fast bench``): the case suites
(``cases_*``), their timing (:mod:`.core`), the command (:mod:`.run`), the performance targets
(:mod:`.targets`) and the charts (:mod:`.plot`)."""
