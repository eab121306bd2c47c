"""``wbsweep bench``: the speed of training as a sweep runs it (:mod:`.command` is the entry)."""
