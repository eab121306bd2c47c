"""Running one sweep on Ray: :class:`.driver.Sweep` builds a :class:`.context.SweepContext`, the
stage graph (:mod:`.graph`, :mod:`.stages`) and its listeners (:mod:`.callbacks`, :mod:`.stage_runs`,
:mod:`.watchdog`), then runs one Ray Tune experiment. Only the driver and the command line know `Sweep`."""
